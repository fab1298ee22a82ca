"""`ray job submit` of examples/job_submit/job.py to a real Ray head started by the test.

The head is started on loopback with its own ports and temp dir (see ``tests/ray_head.py``), token
authentication on for the head and for the ``ray job`` CLI alike, and stopped by pid at the end.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import psutil
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.ray_head import RAY

pytestmark = pytest.mark.slow

JOB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "job_submit")



def ray_job(head, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args, "--address", head.dashboard_url],
                          env=head.env, capture_output=True, text=True, timeout=timeout)


def test_job_submit_maps_over_replicas_and_head_stops_by_pid(head):
    submission_id = f"rhm-job-{uuid.uuid4().hex[:8]}"
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
         "--working-dir", JOB_DIR, "--", "python", "job.py", "--items", "12"],
        env=head.env, capture_output=True, text=True, timeout=180)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output

    status = ray_job(head, "status", submission_id)
    assert f"Job '{submission_id}' succeeded" in status.stdout, status.stdout + status.stderr
    client = JobSubmissionClient(head.dashboard_url)  # token auth: RAY_AUTH_MODE=token here too
    assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED
    logs = ray_job(head, "logs", submission_id).stdout
    assert f"squares: {[x * x for x in range(12)]}" in logs, logs
    assert "encode('ray map') = [0, 1]" in logs, logs
    assert "encode('replica actor job') = [2, 3, 5]" in logs, logs
    assert "encode('unknown words') = [-1, -1]" in logs, logs
    assert "done" in logs

    running = head.stop()
    assert head.leader.pid in running and len(running) > 3
    assert not [pid for pid in running if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not head.pids()
