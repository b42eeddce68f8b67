"""Multi-host test harness: libvirt hosts and etcd members in network namespaces.

See tests/multihost/README.md for the fixtures and helpers.
"""
