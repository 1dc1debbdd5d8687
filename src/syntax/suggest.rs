//! "Did you mean …?" for misspelt and Keras-style names.

/// Keras and PyTorch spellings that people carry over, and the word this language uses.
const FOREIGN_NAMES: &[(&str, &str)] = &[
    ("Conv2D", "conv2d"),
    ("Convolution2D", "conv2d"),
    ("Conv2d", "conv2d"),
    ("conv", "conv2d"),
    ("MaxPooling2D", "maxpool"),
    ("MaxPool2D", "maxpool"),
    ("MaxPool2d", "maxpool"),
    ("max_pooling2d", "maxpool"),
    ("AveragePooling2D", "avgpool"),
    ("AvgPool2D", "avgpool"),
    ("AvgPool2d", "avgpool"),
    ("average_pooling2d", "avgpool"),
    ("BatchNormalization", "batchnorm"),
    ("BatchNorm2d", "batchnorm"),
    ("batch_normalization", "batchnorm"),
    ("Dense", "dense"),
    ("Linear", "dense"),
    ("linear", "dense"),
    ("Dropout", "dropout"),
    ("Flatten", "flatten"),
    ("ReLU", "relu"),
    ("LeakyReLU", "leaky_relu"),
    ("leakyrelu", "leaky_relu"),
    ("Softmax", "softmax"),
    ("Sigmoid", "sigmoid"),
    ("Tanh", "tanh"),
    ("kernel_size", "kernel"),
    ("strides", "stride"),
    ("pool_size", "pool"),
    ("use_bias", "bias"),
    ("negative_slope", "alpha"),
    ("learning_rate", "lr"),
    ("beta_1", "beta1"),
    ("beta_2", "beta2"),
    ("eps", "epsilon"),
    ("batch", "batch_size"),
    ("dataset", "data"),
    ("val_split", "validation_split"),
];

/// The known word closest to `word`: a Keras-style spelling's translation, the same word in
/// other case, or one at a small edit distance.
pub fn suggest(word: &str, known: &[&str]) -> Option<String> {
    if let Some((_, ours)) = FOREIGN_NAMES.iter().find(|(theirs, _)| *theirs == word)
        && known.contains(ours)
    {
        return Some((*ours).to_string());
    }
    let lower = word.to_lowercase();
    if let Some(k) = known.iter().find(|k| k.to_lowercase() == lower) {
        return Some((*k).to_string());
    }
    if lower.len() >= 3
        && let Some(k) = known.iter().find(|k| k.starts_with(&lower))
    {
        return Some((*k).to_string());
    }
    let limit = if word.len() <= 3 { 1 } else { 2 };
    known
        .iter()
        .map(|k| (edit_distance(&lower, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.to_string())
}

pub fn did_you_mean(suggestion: &str) -> String {
    format!("did you mean `{suggestion}`?")
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        let layers = ["conv2d", "maxpool", "dense", "batchnorm"];
        let cases = [
            ("Conv2D", Some("conv2d")),
            ("MaxPooling2D", Some("maxpool")),
            ("BatchNormalization", Some("batchnorm")),
            ("DENSE", Some("dense")),
            ("conv2", Some("conv2d")),
            ("maxpol", Some("maxpool")),
            ("batch", Some("batchnorm")),
            ("lstm", None),
        ];
        for (word, expected) in cases {
            assert_eq!(suggest(word, &layers).as_deref(), expected, "{word}");
        }
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
