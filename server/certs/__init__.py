"""Deployment certificates and keys (private CA, TLS server certificates, SuperNode keys): :mod:`server.certs.pki`."""
