"""Keras 3 / TensorFlow-CPU peer: models/mnist.cnn and models/mnist_bn.cnn as Keras models,
Adam lr 1e-3, categorical cross-entropy, timed with train_on_batch and predict_on_batch (the
compiled tf.function paths that fit and predict run; Keras turns XLA off on CPU-only machines,
so this is TensorFlow's graph runtime with oneDNN).

    python keras_peer.py --model mnist_bn --threads 2

With --fit it trains instead, as the Keras MNIST example does and as `cnnc train` runs
models/mnist.cnn (model.fit: batch 128, validation_split 0.1, shuffled, --epochs epochs), and
after each epoch measures the test set; it prints one JSON line an epoch: the epoch's wall time
(its steps and validation, as cnnc's `seconds`; the test pass is not in it) and the test accuracy.
"""

import json
import os
import time

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


def fit(args, tf, keras, model):
    """Trains with model.fit and prints an epoch's time and test accuracy after each epoch."""
    x, y, x_test, y_test = common.mnist_arrays(args)
    system = f"Keras {keras.__version__} / TF {tf.__version__}"

    class TestEveryEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.started  # steps and validation
            loss, accuracy = self.model.evaluate(x_test, y_test, batch_size=args.batch_size,
                                                 verbose=0)
            print(json.dumps({"system": system, "model": args.model, "threads": args.threads,
                              "epoch": epoch + 1, "seconds": round(seconds, 3),
                              "val_accuracy": logs.get("val_accuracy"),
                              "test_loss": loss, "test_accuracy": accuracy}), flush=True)

    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, validation_split=0.1,
              verbose=0, callbacks=[TestEveryEpoch()])


def fit_flags(p):
    p.add_argument("--fit", action="store_true", help="train with model.fit, measuring the test "
                   "set after every epoch, instead of timing steps")
    p.add_argument("--epochs", type=int, default=15, help="with --fit: epochs to train")
    p.add_argument("--seed", type=int, default=42, help="keras.utils.set_random_seed")


def main():
    args = common.parse_args(__doc__, fit_flags)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf
    import keras

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(args.seed)
    if args.fit:
        return fit(args, tf, keras, build(keras, args.model == "mnist_bn"))
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
