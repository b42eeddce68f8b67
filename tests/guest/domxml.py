"""libvirt domain XML for the vmdr test guest."""

from __future__ import annotations

import os
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from tests.guest import layout as L

METADATA_NS = "urn:vmdr:test-estate"


def _disk(path: Path, dev: str, fmt: str, boot_order: int | None) -> str:
    boot = f"<boot order='{boot_order}'/>" if boot_order else ""
    return (
        "    <disk type='file' device='disk'>\n"
        f"      <driver name='qemu' type='{fmt}' discard='unmap'/>\n"
        f"      <source file={quoteattr(str(path))}/>\n"
        f"      <target dev='{dev}' bus='virtio'/>{boot}\n"
        "    </disk>\n"
    )


def make_domain_xml(
    name: str,
    boot_disk: str | Path,
    data_disk: str | Path | None,
    *,
    memory_mib: int = 192,
    vcpus: int = 1,
    agent: bool = True,
    console_log: str | Path | None = None,
    raw: bool = False,
    network: str | None = None,
    writer_rate: int | None = None,
    machine: str = "pc",
    graphics: bool = True,
    metadata: dict[str, str] | None = None,
    domain_type: str | None = None,
) -> str:
    """Domain XML: TCG guest booting from ``boot_disk`` (vda) with ``data_disk`` (vdb).

    * ``raw``: both disks are raw instead of qcow2.
    * ``console_log``: serial console (pty) is also logged to this file (virtlogd).
    * ``agent``: add the org.qemu.guest_agent.0 virtio-serial channel.
    * ``network``: name of a libvirt network for one virtio NIC (none by default; see
      ``estate.ensure_isolated_network``). The guest does not configure it.
    * ``writer_rate``: records/s for vmdr-writer via fw_cfg ``opt/org.vmdr/rate``
      (overrides the kernel command line default; 0 stops the writer).
    * ``graphics``: VNC on 127.0.0.1 + VGA, so virDomainScreenshot works.
    * ``metadata``: attributes of a ``<vmdrtest:owner>`` element (used by cleanup_stale).
    * ``domain_type``: "qemu" (TCG) or "kvm"; default: kvm only if usable (vmx/svm and
      /dev/kvm), overridable with the environment variable VMDR_GUEST_DOMAIN_TYPE.
    """
    fmt = "raw" if raw else "qcow2"
    domain_type = (
        domain_type
        or os.environ.get("VMDR_GUEST_DOMAIN_TYPE")
        or ("kvm" if _kvm_usable() else "qemu")
    )
    parts = [f"<domain type='{domain_type}'>\n  <name>{escape(name)}</name>\n"]
    if metadata:
        attrs = " ".join(f"{k}={quoteattr(v)}" for k, v in sorted(metadata.items()))
        parts.append(
            f"  <metadata>\n    <vmdrtest:owner xmlns:vmdrtest='{METADATA_NS}' "
            f"{attrs}/>\n  </metadata>\n"
        )
    parts.append(f"  <memory unit='MiB'>{memory_mib}</memory>\n  <vcpu>{vcpus}</vcpu>\n")
    if writer_rate is not None:
        parts.append(
            "  <sysinfo type='fwcfg'>\n"
            f"    <entry name='{L.FW_CFG_RATE_NAME}'>{int(writer_rate)}</entry>\n"
            "  </sysinfo>\n"
        )
    parts.append(
        f"  <os>\n    <type arch='x86_64' machine='{machine}'>hvm</type>\n"
        "    <bootmenu enable='no'/>\n"
        "    <bios useserial='yes'/>\n  </os>\n"  # SeaBIOS messages on the serial console
        "  <features><acpi/><apic/></features>\n"
        "  <clock offset='utc'/>\n"
        "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
    )
    parts.append(_disk(Path(boot_disk), "vda", fmt, 1))
    if data_disk is not None:
        parts.append(_disk(Path(data_disk), "vdb", fmt, None))
    log = f"<log file={quoteattr(str(console_log))} append='off'/>" if console_log else ""
    parts.append(
        f"    <serial type='pty'>{log}<target port='0'/></serial>\n"
        "    <console type='pty'><target type='serial' port='0'/></console>\n"
    )
    if agent:
        parts.append(
            "    <channel type='unix'>\n"
            f"      <target type='virtio' name='{L.AGENT_CHANNEL}'/>\n"
            "    </channel>\n"
        )
    if network:
        parts.append(
            f"    <interface type='network'><source network={quoteattr(network)}/>"
            "<model type='virtio'/></interface>\n"
        )
    if graphics:
        parts.append(
            "    <graphics type='vnc' autoport='yes' listen='127.0.0.1'>"
            "<listen type='address' address='127.0.0.1'/></graphics>\n"
            "    <video><model type='vga' vram='16384' heads='1'/></video>\n"
        )
    parts.append(
        "    <controller type='usb' model='none'/>\n"
        "    <memballoon model='none'/>\n  </devices>\n</domain>\n"
    )
    return "".join(parts)


def _kvm_usable() -> bool:
    """KVM only if the CPU has vmx/svm and /dev/kvm exists; TCG otherwise."""
    if not Path("/dev/kvm").exists():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " vmx" in flags or " svm" in flags
