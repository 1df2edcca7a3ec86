"""A CPU-sized f4 KL autoencoder on CIFAR-10 (32x32x3 -> 8x8x4), autoencoder_mnist's recipe
with three channels and a wider network; CIFAR-10 from a cifar-10-batches-py folder
(--config.data.params.path) or tensorflow-datasets' cifar10.
"""

from sgm_jax.configs import autoencoder_kl_f4 as f4
from sgm_jax.configs import autoencoder_mnist


def get_config():
    config = autoencoder_mnist.get_config()
    enc = f4.ddconfig(z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=64, ch_mult=(1, 1, 2),
                      num_res_blocks=1)
    loss = config.model.params.loss_config.to_dict()
    loss["params"].update(disc_in_channels=3)
    loss["params"]["discriminator_config"]["params"]["input_nc"] = 3
    config.model = f4.model(base_learning_rate=5.0e-4, encoder=enc, loss=loss, ema_decay=0.999)
    config.data = {"target": "sgm.data.cifar10.CIFAR10Loader",
                   "params": {"batch_size": 16, "num_workers": 1, "path": ""}}
    config.training.name = "autoencoder_cifar10"
    return config
