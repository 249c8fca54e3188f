"""`ray job submit ... -- python jobs/serve.py [smpp serve flags]`: the scoring endpoint as a Ray job.

Inside a job RAY_ADDRESS is set, so Serve starts on the cluster; the job runs until stopped
(`jobs/submit.sh stop ID`) or for `--duration-s`. The stage runs in a supervised child, so a
driver killed by a signal is reported plainly.
"""

import sys

from smpp_ray.job_entry import run_job

if __name__ == "__main__":
    sys.exit(run_job("serve", sys.argv[1:]))
