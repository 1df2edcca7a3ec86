"""mnist_cond_cpu's model and recipe, trained from webdataset tar shards through config.data alone
(the seed's StableDataModuleFromConfig layout: datapipeline + loader).

    python prepare_data.py digits/ shards/ --samples-per-shard 1000     # digits/<class>/*.png
    python train.py --config configs/mnist_cond_tar.py \
        --config.data.params.train.datapipeline.urls='shards/data-{000000..000059}.tar' --config.training.max_steps=3000

Samples need <key>.png|jpg and <key>.cls (class folders give both); images are read as
grayscale ("l8") and used at 28 x 28 as stored. A stream has no epochs: set max_steps.
"""

from sgm_jax.configs import mnist_cond_cpu


def datapipeline(urls="", **pipeline_config):
    config = {"shardshuffle": 10000, "sample_shuffle": 1000, "required_keys": ["jpg", "cls"],
              "skip_bad_samples": True, "aspect_buckets": [], "num_streams": 0}
    config.update(pipeline_config)
    return {
        "urls": urls,  # shard paths, globs, brace patterns, folders, gs://...
        "pipeline_config": config,
        "decoders": ["l8"],
        "postprocessors": [
            {"target": "sdata.mappers.TorchVisionImageTransforms",
             "params": {"key": "jpg", "transforms": [{"target": "torchvision.transforms.ToTensor"}]}},
            {"target": "sdata.mappers.Rescaler"},
        ],
    }


def get_config():
    config = mnist_cond_cpu.get_config()
    config.data = {"target": "sgm.data.dataset.StableDataModuleFromConfig", "params": {"train": {
        "datapipeline": datapipeline(),
        "loader": {"batch_size": 32, "num_workers": 0},
    }}, "allow_changed_shards": False}  # True: resume on shards replaced under their names, with a warning
    config.training.update(name="mnist_cond_tar", max_steps=3000, max_minutes=0.0)
    return config
