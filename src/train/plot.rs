//! A plot of loss and accuracy per epoch (train and validation), as a standalone SVG.
