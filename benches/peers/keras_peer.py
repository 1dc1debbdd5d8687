"""Keras 3 / TensorFlow-CPU peer: models/mnist.cnn and models/mnist_bn.cnn as Keras models,
Adam lr 1e-3, categorical cross-entropy, timed with train_on_batch and predict_on_batch (the
compiled tf.function paths that fit and predict run; Keras turns XLA off on CPU-only machines,
so this is TensorFlow's graph runtime with oneDNN).

    python keras_peer.py --model mnist_bn --threads 2
"""

import os

import common


def build(keras, bn):
    L = keras.layers
    layers = [keras.Input((28, 28, 1))]
    for filters in (32, 64):
        if bn:  # BatchNormalization's defaults are momentum 0.99, epsilon 1e-3
            layers += [L.Conv2D(filters, 3, use_bias=False), L.BatchNormalization(), L.ReLU()]
        else:
            layers += [L.Conv2D(filters, 3, activation="relu")]
        layers += [L.MaxPooling2D(2)]
    layers += [L.Flatten(), L.Dropout(0.5), L.Dense(common.CLASSES, activation="softmax")]
    return keras.Sequential(layers)


def main():
    args = common.parse_args(__doc__)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf
    import keras

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(42)
    batches, infer = common.mnist_batches(args)
    batches = [(tf.constant(x), tf.constant(y)) for x, y in batches]
    infer = tf.constant(infer)
    model = build(keras, args.model == "mnist_bn")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")

    def train_step(i):
        return model.train_on_batch(*batches[i])  # returns the loss as a Python float

    def infer_step(_):
        return model.predict_on_batch(infer)  # returns a NumPy array

    common.bench(args, f"Keras {keras.__version__} / TF {tf.__version__}", train_step,
                 infer_step, len(batches))


if __name__ == "__main__":
    main()
