"""The remote side: locations, credentials, clients, one tree listing, manifests, transfer."""
