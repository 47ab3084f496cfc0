"""The operations catalog (no libvirt) and the libvirt wing's runners name the same
operations, and every virsh name points at one of them."""

from relay.catalog import OPERATIONS, VIRSH_NAMES
from relay.libvirt.operations import RUNNERS


def test_every_operation_of_the_catalog_has_a_runner_and_no_runner_is_uncatalogued():
    assert set(RUNNERS) == set(OPERATIONS)


def test_every_virsh_name_names_an_operation():
    assert set(VIRSH_NAMES.values()) <= set(OPERATIONS)
