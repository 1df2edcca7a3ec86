"""Evaluate generated images: FID, CLIP score, MNIST class accuracy, reconstruction metrics.

    python evaluate.py --workdir workdir/mnist_cond_cpu --classes 0,1,2,3,4,5,6,7,8,9 --num 1000 \
        --metrics fid,classifier --ref mnist:test
    python evaluate.py --images samples/ --ref real.npz --metrics fid,clip_score

The command line lives in sgm_jax/cli/evaluate.py (--help for every flag).
"""

from sgm_jax.cli.evaluate import main

if __name__ == "__main__":
    main()
