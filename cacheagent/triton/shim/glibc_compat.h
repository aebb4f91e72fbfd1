/* Pin the glibc symbols the shim uses to their oldest x86_64 versions.
 *
 * Built on glibc >= 2.34, dladdr and pthread_mutex_trylock would bind to their
 * GLIBC_2.34 versions (libdl and libpthread were merged into libc then) and
 * pthread_sigmask to GLIBC_2.32, so the library would refuse to load on older
 * systems (Ubuntu 20.04 has 2.31). The GLIBC_2.2.5 versions are the same
 * functions, still exported by every glibc since; older glibcs export them from
 * libdl.so.2 and libpthread.so.0, which setup.py therefore links explicitly.
 *
 * setup.py passes this header with -include on glibc builds only (it comes before
 * any system header, so __GLIBC__ cannot be tested here), and the versions are
 * x86_64's (aarch64's oldest is GLIBC_2.17 anyway). It changes which symbol
 * version is bound, never what the code does.
 */
#if defined(__x86_64__)
__asm__(".symver dladdr,dladdr@GLIBC_2.2.5");
__asm__(".symver pthread_mutex_trylock,pthread_mutex_trylock@GLIBC_2.2.5");
__asm__(".symver pthread_sigmask,pthread_sigmask@GLIBC_2.2.5");
#endif
