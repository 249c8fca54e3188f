"""`ray job submit ... -- python jobs/extract.py [smpp extract flags]`: the `smpp extract` stage as a Ray job.

Inside a job RAY_ADDRESS is set, so the stage joins the cluster instead of starting a local Ray.
"""

import sys

from smpp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
