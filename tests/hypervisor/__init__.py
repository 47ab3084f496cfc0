"""Integration tests against a real hypervisor: libvirtd + qemu/KVM (else TCG) on qemu:///system."""
