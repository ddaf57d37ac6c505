"""A real one-node SLURM cluster on this machine, for tests: munged + slurmctld + slurmd as root.

Every piece of state (slurm.conf, spool and state folders, munge socket, logs, pid files) lives
in one temporary folder; the daemons are ended by their pids. Needs Debian's `slurm-wlm` and
`munge` packages and root (`apt-get install -y slurm-wlm munge`; `.ci/run` installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "srun")


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    missing = [b for b in BINARIES if shutil.which(b) is None
               and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"SLURM binaries missing ({', '.join(missing)}): run as root "
                "`apt-get install -y slurm-wlm munge`, then the tests again (as .ci/run does)")
    if os.geteuid() != 0:
        return "a one-node SLURM cluster is started as root: run these tests as root (.ci/run)"
    return None


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """munged, slurmctld and slurmd with state under `root`; `env` points clients at it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        # slurmd finds its node by the short host name; the daemons talk over the loopback, so
        # a host name that does not resolve (many containers) does not matter
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._pidfiles = []

    def _write_conf(self) -> None:
        cpus = len(os.sched_getaffinity(0))  # what slurmd sees (a container may have fewer)
        # more than the machine has would leave the node invalid (drained)
        memory_mb = min(4000, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
        r = self.root
        for sub in ("state", "spool", "munge"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=nstdettest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=kill_invalid_depend
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
SlurmctldPort=16817
SlurmdPort=16818
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def start(self) -> SlurmCluster:
        """Start the three daemons and wait until the node takes jobs."""
        self._write_conf()
        socket_path = self.root / "munge" / "munge.socket"
        munge_pid = self.root / "munged.pid"
        subprocess.run([_bin("munged"), "--force", f"--socket={socket_path}",
                        f"--pid-file={munge_pid}", f"--log-file={self.root / 'munged.log'}",
                        f"--seed-file={self.root / 'munge' / 'seed'}"], check=True)
        self._pidfiles.append(munge_pid)
        # slurm's daemons and clients find munged through this socket path in slurm.conf
        with open(self.conf, "a") as f:
            f.write(f"AuthInfo=socket={socket_path}\n")
        for daemon, pidfile in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            subprocess.run([_bin(daemon), "-f", str(self.conf)], check=True, env=self.env)
            self._pidfiles.append(self.root / pidfile)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env,
                                   capture_output=True, text=True).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM node did not become idle (state {state!r}); see "
                           f"{self.root}/slurmctld.log and slurmd.log")

    def stop(self) -> None:
        """End the daemons by pid (slurmd, slurmctld, munged) and wait for them."""
        for pidfile in reversed(self._pidfiles):
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        self._pidfiles.clear()
