"""Domain XML rewriting for restore."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import pytest

from vmdr.hypervisor import domain_name, domain_uuid, rewrite_domain_xml

LIVE = """<domain type='kvm' id='7'>
  <name>web</name>
  <uuid>aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee</uuid>
  <memory unit='KiB'>1048576</memory>
  <os><type arch='x86_64'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/img/web.qcow2' index='2'/>
      <backingStore type='file' index='3'><format type='qcow2'/><source file='/img/base.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/data' index='1'><host name='mon1'/></source>
      <auth username='admin'><secret type='ceph' uuid='1234'/></auth>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:11:22:33'/>
      <source network='default'/>
      <target dev='vnet3'/>
      <alias name='net0'/>
    </interface>
    <serial type='pty'><source path='/dev/pts/4'/><target port='0'/><alias name='serial0'/>
    </serial>
    <graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'/>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-aaaa</label></seclabel>
</domain>"""


def _counter() -> object:
    c = itertools.count(1)
    return lambda n: bytes([next(c) % 256] * n)


def test_clone_gets_new_identity_and_disks() -> None:
    out = rewrite_domain_xml(
        LIVE, new_name="web-restored",
        disk_paths={"vda": ("/restore/vda.qcow2", "qcow2"), "vdb": ("/dev/vg/data", "raw")},
        nvram_path="/restore/web_VARS.fd", rand=_counter())  # type: ignore[arg-type]
    root = ET.fromstring(out)
    assert domain_name(out) == "web-restored"
    assert domain_uuid(out) not in (None, "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
    mac = root.find("./devices/interface/mac")
    assert mac is not None and mac.get("address") != "52:54:00:11:22:33"
    assert (mac.get("address") or "").startswith("52:54:00:")
    vda, vdb = root.findall("./devices/disk")
    assert vda.find("source").attrib == {"file": "/restore/vda.qcow2"}  # type: ignore[union-attr]
    assert vda.find("backingStore") is None
    assert vdb.get("type") == "block"
    assert vdb.find("source").attrib == {"dev": "/dev/vg/data"}  # type: ignore[union-attr]
    assert vdb.find("auth") is None and vdb.find("driver").get("type") == "raw"  # type: ignore
    nv = root.find("./os/nvram")
    assert nv is not None and nv.text == "/restore/web_VARS.fd"


def test_runtime_bits_always_stripped() -> None:
    out = rewrite_domain_xml(LIVE)
    root = ET.fromstring(out)
    assert root.get("id") is None
    assert root.find(".//alias") is None
    assert root.find("seclabel") is None
    assert root.find("./devices/interface/target") is None
    assert root.find("./devices/serial/source") is None
    assert root.find("./devices/graphics").get("port") is None  # type: ignore[union-attr]
    assert all(s.get("index") is None for s in root.iter("source"))
    # same name: identity kept
    assert domain_uuid(out) == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    assert root.find("./devices/interface/mac").get("address") == "52:54:00:11:22:33"  # type: ignore


def test_explicit_identity_flags() -> None:
    out = rewrite_domain_xml(LIVE, new_uuid=True, new_macs=False)
    assert domain_uuid(out) != "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    assert "52:54:00:11:22:33" in out
    out = rewrite_domain_xml(LIVE, new_name="x", new_uuid=False)
    assert domain_uuid(out) == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def test_errors() -> None:
    with pytest.raises(ValueError, match="no disk vdz"):
        rewrite_domain_xml(LIVE, disk_paths={"vdz": ("/x", "raw")})
    with pytest.raises(ValueError):
        rewrite_domain_xml("<domainsnapshot/>")
    with pytest.raises(ValueError, match="DTD"):
        rewrite_domain_xml('<!DOCTYPE d [<!ENTITY a "b">]><domain/>')


_CAPS = """<capabilities><host><uuid>x</uuid>
<secmodel><model>none</model><doi>0</doi></secmodel>
<secmodel><model>dac</model><doi>0</doi>
<baselabel type='kvm'>+64055:+994</baselabel><baselabel type='qemu'>+64055:+994</baselabel>
</secmodel></host></capabilities>"""


def test_dac_identity_is_qemus_uid_and_gid_from_the_capabilities() -> None:
    from vmdr.hypervisor.xml import dac_identity

    assert dac_identity(_CAPS) == (64055, 994)
    assert dac_identity(_CAPS.replace("+64055:+994", "+0:+0")) == (0, 0)  # user = "root"
    # a session instance reports no DAC model: QEMU runs as the connecting user
    assert dac_identity("<capabilities><host><secmodel><model>none</model></secmodel>"
                        "</host></capabilities>") is None
    assert dac_identity(_CAPS.replace("+64055:+994", "garbage")) is None


def test_the_test_failover_export_is_never_world_accessible() -> None:
    """The reader script gives its socket QEMU's group (0660) or keeps it to its owner
    (0600); the arguments it gets for each case."""
    from vmdr.jobs import failover_site as fs

    assert "0666" not in fs._READER and "umask 077" in fs._READER
    assert fs.export_owner((64055, 994)) == ("64055", "994")
    assert fs.export_owner(None) == ("", "")
