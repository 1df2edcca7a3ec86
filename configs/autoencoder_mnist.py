"""A CPU-sized f4 KL autoencoder on real MNIST (the seed's kl-f4 recipe, shrunk): digits padded
to 32x32 -> 8x8x4 latents, the first stage for CPU-sized latent models.

    python train.py --config configs/autoencoder_mnist.py            # ~10 minutes on 2 cores

Changes from autoencoder_kl_f4 and why (benchmarks/autoencoder_psnr.py has the PSNR per CPU minute):
* the networks: ch 32, ch_mult (1, 1, 2), one res block per level (2 x 0.3M parameters);
* no LPIPS (perceptual_weight 0): VGG16 costs more than the autoencoder at this size and its
  weights are not shipped; with them converted, set perceptual_weight=0.25 like the seed;
* batch 16, Adam lr 5e-4 (the seed: 4.5e-6 at batch 8 for 256 px ImageNet);
* KL weight 1e-6 as the LDM kl-f* autoencoders (the seed's kl-f4 example uses 1.0 with a
  learned log-variance over 256x256x3 pixels; on 1,024 MNIST pixels that weight empties the latent);
* the PatchGAN (2 layers, 32 filters, 1 channel) from step 1001 with the seed's adaptive weight;
* an EMA (0.999) of the weights, which is what load_first_stage and the export use.
"""

from sgm_jax.configs import autoencoder_kl_f4 as f4


def get_config():
    config = f4.get_config()
    enc = f4.ddconfig(z_channels=4, resolution=32, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 1, 2),
                      num_res_blocks=1)
    disc = {"target": "sgm.modules.autoencoding.lpips.model.model.NLayerDiscriminator",
            "params": {"input_nc": 1, "n_layers": 2, "ndf": 32, "use_actnorm": False}}
    loss = f4.loss_config(perceptual_weight=0.0, disc_start=1001, disc_in_channels=1, learn_logvar=True,
                          regularization_weights={"kl_loss": 1.0e-6}, discriminator_config=disc)
    config.model = f4.model(base_learning_rate=5.0e-4, encoder=enc, loss=loss, ema_decay=0.999)
    # path: folder of the four MNIST IDX files; "" searches the usual places (README "Data")
    config.data = {"target": "sgm.data.mnist.MNISTLoader",
                   "params": {"batch_size": 16, "num_workers": 1, "path": ""},
                   "pad_to": 32}  # 28 -> 32 with the background value, in the task (not the loader)
    config.training = f4.training(name="autoencoder_mnist", max_minutes=10.0, max_epochs=100, log_every=25,
                                  checkpoint_every=500, sample_every=500, num_samples=16, sample_nrow=8,
                                  eval_every=500, eval_examples=256, eval_batch_size=64)
    return config
