"""Tests of the libvirt wing (relay/libvirt/) against libvirt's test driver and a private
libvirtd."""
