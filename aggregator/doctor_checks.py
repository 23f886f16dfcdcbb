"""The checks `aggregator doctor` runs on the consortium host: certificate, disk, GPU.

(The TLS probe of the SuperLink is shared with the silo: :mod:`fedsilo_base.tls_probe`.)
"""

from __future__ import annotations

from pathlib import Path

from aggregator.consortium_home import ConsortiumHome
from aggregator.pki import PkiError, certificate_info, superlink_hosts, verify_issued_by


def check_server_certificate(home: ConsortiumHome, warn_days: float = 30.0) -> tuple[bool, str]:
    """(ok, one line) about the SuperLink certificate: signed by our CA, valid, SAN matches."""
    try:
        verify_issued_by(home.server_cert, home.serving_ca_cert)
        info = certificate_info(home.server_cert)
    except PkiError as exc:
        return False, f"{exc}; run 'aggregator renew'"
    left = info.days_left()
    host = superlink_hosts(home.address)[0]
    if host not in info.sans:
        return False, (
            f"SuperLink certificate has no SAN for {host} (has {', '.join(info.sans)}); "
            f"run 'aggregator renew'"
        )
    if left < 0:
        return False, "SuperLink certificate has EXPIRED; run 'aggregator renew'"
    if left < warn_days:
        return False, f"SuperLink certificate expires in {left:.0f} days; run 'aggregator renew'"
    sans = ", ".join(info.sans)
    return True, f"SuperLink certificate valid for {left:.0f} more days, SANs {sans}"



def free_disk_check(path: Path, minimum_gb: float = 5.0) -> tuple[bool, str]:
    """(ok, line) about free disk space where path lives."""
    import shutil

    free = shutil.disk_usage(path).free / 1e9
    if free < minimum_gb:
        return False, f"only {free:.1f} GB free at {path}; free at least {minimum_gb:.0f} GB"
    return True, f"{free:.1f} GB free at {path}"


def gpu_check() -> tuple[bool, str]:
    """(True, line) saying whether a CUDA GPU is visible (informational, never a failure)."""
    try:
        import torch

        if torch.cuda.is_available():
            return True, f"GPU visible: {torch.cuda.get_device_name(0)}"
    except Exception:  # a broken CUDA install is reported as 'no GPU', not a crash
        pass
    return True, "no GPU visible (training runs on CPU)"

