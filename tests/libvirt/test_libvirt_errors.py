"""libvirt errors become the project's own types at the edge, classified by what to do next."""

from __future__ import annotations

import libvirt
import pytest

from chaos.libvirtd import private_libvirtd
from harness.libvirt_side import Scratch
from relay.errors import LibvirtNotSupported, LibvirtPermanent, LibvirtTransient
from relay.libvirt.errors import classify_libvirt_error, is_missing, libvirt_calls


def test_missing_objects_and_invalid_requests_are_permanent(libvirt_conn):
    with pytest.raises(LibvirtPermanent) as missing, libvirt_calls():
        libvirt_conn.lookupByUUIDString("00000000-0000-0000-0000-000000000000")
    assert is_missing(missing.value) and missing.value.code == libvirt.VIR_ERR_NO_DOMAIN
    assert isinstance(missing.value.__cause__, libvirt.libvirtError)
    assert "retrying the same call will not help" in str(missing.value)

    with pytest.raises(LibvirtPermanent) as invalid, libvirt_calls():
        libvirt_conn.defineXML("<domain type='test'><name>no-memory</name></domain>")
    assert not is_missing(invalid.value)

    scratch = Scratch(libvirt_conn)
    try:
        with pytest.raises(LibvirtPermanent) as operation, libvirt_calls():
            scratch.pool().listAllVolumes()  # the pool is not active
        assert operation.value.code == libvirt.VIR_ERR_OPERATION_INVALID
    finally:
        scratch.cleanup()


def test_a_call_the_driver_lacks_is_not_supported(libvirt_conn):
    with pytest.raises(LibvirtNotSupported, match="not supported"), libvirt_calls():
        libvirt_conn.setKeepAlive(5, 3)


def test_a_closed_connection_is_transient():
    conn = libvirt.open("test:///default")
    conn.close()
    with pytest.raises(LibvirtTransient), libvirt_calls():
        conn.listAllDomains()


def test_a_dead_libvirtd_is_transient_for_calls_and_for_opening():
    with private_libvirtd() as daemon:
        conn = libvirt.open(daemon.uri)
        daemon.kill()
        try:
            conn.listAllDomains()
        except libvirt.libvirtError as error:
            assert isinstance(classify_libvirt_error(error), LibvirtTransient)
        else:
            pytest.fail("a call on a connection to a killed libvirtd succeeded")
        with pytest.raises(LibvirtTransient), libvirt_calls():
            libvirt.open(daemon.uri)
