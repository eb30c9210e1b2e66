"""A real single-node SLURM on localhost for the tests: slurmctld + slurmd in a temporary folder, as root.

AuthType=auth/none, CredType=cred/none, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none.
Started and stopped by the `slurm` fixture; where it cannot start, the tests skip with the reason.
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 1024
    return 4000


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.procs = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def why_not(self) -> str | None:
        for tool in ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel"):
            if shutil.which(tool) is None:
                return f"needs SLURM: apt-get install slurm-wlm ({tool} not found; .ci/run installs it)"
        if os.geteuid() != 0:
            return "needs root: the test SLURM runs its daemons as root (as .ci/run does)"
        return None

    def start(self, timeout: float = 60) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(f"""ClusterName=tribunaltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_mem_mb()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
        self.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf), "-N", host], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip()
            if out in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM did not come up: sinfo says {out!r}; logs in {r}/log: {self.logs()}")

    def logs(self) -> str:
        text = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.root / "log" / name
            if p.exists():
                text.append(name + ": " + " | ".join(p.read_text().splitlines()[-5:]))
        return "\n".join(text)

    def run(self, args, check=True):
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def task_states(self, job: str) -> dict:
        out = self.run(["squeue", "-h", "-r", "-j", job, "-o", "%i %T"], check=False).stdout
        return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}

    def stop(self) -> None:
        self.run(["scancel", "--user", "root"], check=False)
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
