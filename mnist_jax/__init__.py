"""mnist_jax: the Keras MNIST notebook as a small, fast JAX research codebase."""
