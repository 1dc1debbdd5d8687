//! The IDX file format (MNIST's), plain or gzip-compressed.
