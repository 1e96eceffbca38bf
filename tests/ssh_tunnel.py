"""A throwaway sshd on 127.0.0.1 with key login, and `ssh -N -L` tunnels through it, for the SLURM tests.

Follows /work/shared/slurm-local.md section 6: host and user keys generated per test session, `UsePAM no`,
`StrictModes no` (the keys live under /tmp). sshd runs in the foreground (`-D`) as a ManagedProcess, so it is
stopped by its own process group like everything else the tests start.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.processes import ManagedProcess, free_port

SSHD = "/usr/sbin/sshd"


def missing_reason() -> str | None:
    """Why no tunnel can be built here (None when it can)."""
    if os.geteuid() != 0:
        return "the SSH tunnel test needs root (sshd with key login as root)"
    if not Path(SSHD).exists() or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        return "openssh-server/openssh-client not installed: run scripts/prepare_system_tests.sh"
    return None


class SshServer:
    """sshd on 127.0.0.1:<port> accepting one throwaway ed25519 key for root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        for name in ("host_ed25519", "user_ed25519"):
            keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)]
            subprocess.run(keygen, check=True)
        shutil.copy(root / "user_ed25519.pub", root / "authorized_keys")
        config = root / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nHostKey {root}/host_ed25519\n"
            f"PidFile {root}/sshd.pid\nAuthorizedKeysFile {root}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nAllowTcpForwarding yes\n"
            "X11Forwarding no\nPrintMotd no\nLogLevel VERBOSE\n"
        )
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        subprocess.run([SSHD, "-t", "-f", str(config)], check=True)
        self.process = ManagedProcess([SSHD, "-D", "-f", str(config), "-e"], root / "sshd.log")
        _wait_port(self.port, 10, self.process)

    def tunnel(self, local_port: int, target_host: str, target_port: int, log: Path) -> ManagedProcess:
        """`ssh -N -L local_port:target_host:target_port root@127.0.0.1`, as a user would run it."""
        args = [
            "ssh", "-N", "-L", f"{local_port}:{target_host}:{target_port}", "-p", str(self.port),
            "-i", str(self.root / "user_ed25519"), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
            "-o", "LogLevel=ERROR", "root@127.0.0.1",
        ]
        proc = ManagedProcess(args, log)
        _wait_port(local_port, 15, proc)
        return proc

    def stop(self) -> None:
        self.process.stop()


def _wait_port(port: int, timeout: float, proc: ManagedProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s:\n{proc.log_tail()}")
