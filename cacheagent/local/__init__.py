"""The local side: the content-addressed store, the index, locks and atomic writes."""
