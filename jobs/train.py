"""`ray job submit ... -- python jobs/train.py [smpp train flags]`: the `smpp train` stage as a Ray job.

Inside a job RAY_ADDRESS is set, so the stage joins the cluster instead of starting a local Ray.
"""

import sys

from smpp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
