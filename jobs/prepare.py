"""`ray job submit ... -- python jobs/prepare.py [smpp prepare flags]`: the `smpp prepare` stage as a Ray job.

Inside a job RAY_ADDRESS is set, so the stage joins the cluster instead of starting a local Ray.
"""

import sys

from smpp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
