"""vmdr: disaster recovery and backup for KVM/QEMU virtual machines managed by libvirt."""

__version__ = "0.1.0"
