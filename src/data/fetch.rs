//! Finding dataset files: the cache directory, fetching MNIST, and Debian's Fashion-MNIST.
