"""PyTorch peer: models/mnist.cnn and models/mnist_bn.cnn in eager PyTorch, channels_last
(or torch.compile with --compile), Adam lr 1e-3, categorical cross-entropy.

    python torch_peer.py --model mnist_bn --threads 2 [--compile]
"""

import common


def extra(p):
    p.add_argument("--compile", action="store_true", help="torch.compile the model (Inductor)")


def build(nn, bn):
    def block(cin, cout):
        if not bn:
            return [nn.Conv2d(cin, cout, 3), nn.ReLU(), nn.MaxPool2d(2)]
        # Keras's BatchNormalization(momentum=0.99, epsilon=1e-3): torch's momentum is 1 - 0.99.
        return [nn.Conv2d(cin, cout, 3, bias=False), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
                nn.ReLU(), nn.MaxPool2d(2)]
    # The softmax is folded into the loss (cross_entropy takes logits), as Keras does too.
    return nn.Sequential(*block(1, 32), *block(32, 64), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(5 * 5 * 64, common.CLASSES))


def main():
    args = common.parse_args(__doc__, extra)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(42)
    batches, infer = common.mnist_batches(args)

    def nchw(x):  # NHWC numpy -> NCHW tensor stored channels_last (no copy of the layout)
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    batches = [(nchw(x), torch.from_numpy(y)) for x, y in batches]
    infer = nchw(infer)
    model = build(torch.nn, args.model == "mnist_bn").to(memory_format=torch.channels_last)
    # Adam as Keras's: epsilon 1e-7 (torch's default is 1e-8).
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    net = torch.compile(model) if args.compile else model

    def train_step(i):
        x, y = batches[i]
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)  # y: one-hot probabilities
        loss.backward()
        opt.step()
        return loss.item()  # CPU ops are synchronous; this is only a cheap check it finished

    def infer_step(_):
        model.eval()
        with torch.inference_mode():
            return net(infer).numpy()

    system = "torch.compile" if args.compile else "PyTorch eager"
    common.bench(args, f"{system} {torch.__version__.split('+')[0]}", train_step, infer_step,
                 len(batches))


if __name__ == "__main__":
    main()
