"""Train one ssgd-dist run on a Ray cluster: the entrypoint for ``ray job submit``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/ray_job.py --config quickstart --num-workers 2 \\
        [--use-gpu] [--set key=value ...] [--storage-path PATH_OR_URI] [--name RUN] \\
        [--local-dir DIR] [--max-failures N] [--num-to-keep N] [--resize-interval S]

``--num-workers MIN-MAX`` (e.g. ``1-2``) makes the run elastic: Ray continues it on fewer workers when
some are lost and on more when they return, from the newest checkpoint, with the same result.

Ray Train workers run the same loop and DDP S-SGD step as ``torchrun -m ssgd_dist.cli train``; the run
directory is ``<storage-path>/<name>`` (``config.yaml``, ``metrics.jsonl``, ``checkpoints/last.pt``), so
``ssgd-dist report`` reads it, and re-submitting with the same ``--name`` resumes. On a multi-node
cluster the storage path must be shared by all nodes, or an object store (``s3://...``).

Exit codes: 0 done, 2 a configuration or launch error (one line), 1 training failed.
The logic lives in ``ssgd_dist.launchers.ray_job``; see docs/ray.md.
"""

import sys

from ssgd_dist.launchers.ray_job import main

if __name__ == "__main__":
    sys.exit(main())
