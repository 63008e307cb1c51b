"""GAN family: GANomaly (Akcay et al. 2018) and discriminative-generative
representation learning (Xia et al. 2021), on DCGAN networks."""
