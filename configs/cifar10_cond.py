"""The seed's toy/cifar10_cond.yaml: mnist_cond's network on 3-channel CIFAR-10 (32x32)."""

from sgm_jax.configs import mnist_cond


def get_config():
    config = mnist_cond.get_config()
    config.model.params.network_config = mnist_cond.unet(in_channels=3, out_channels=3)
    # path: a cifar-10-batches-py folder; "" uses tensorflow-datasets' cifar10
    config.data = {"target": "sgm.data.cifar10.CIFAR10Loader",
                   "params": {"batch_size": 512, "num_workers": 1, "path": ""}}
    config.training.update(name="cifar10_cond", num_samples=64, sample_nrow=8)
    return config
