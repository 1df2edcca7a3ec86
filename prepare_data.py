"""Pack your images into training shards, once, before training on them:

    python prepare_data.py my_images/ shards/ --samples-per-shard 1000
    python train.py --config configs/mnist_cond_tar.py --config.data.params.train.datapipeline.urls='shards/data-{000000..000009}.tar'

my_images/ holds images with same-name .txt captions, or one sub-folder per class; a CSV or
parquet table of path,caption rows works too. See sgm_jax/data/prepare.py.
"""

from sgm_jax.data.prepare import main

if __name__ == "__main__":
    main()
