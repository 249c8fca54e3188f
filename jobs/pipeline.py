"""`ray job submit ... -- python jobs/pipeline.py [smpp pipeline flags]`: the `smpp pipeline` stage as a Ray job.

Inside a job RAY_ADDRESS is set, so the stage joins the cluster instead of starting a local Ray.
The stage runs in a supervised child, so a driver killed by a signal is reported plainly.
"""

import sys

from smpp_ray.job_entry import run_job

if __name__ == "__main__":
    sys.exit(run_job("pipeline", sys.argv[1:]))
