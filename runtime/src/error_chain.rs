//! One line for an error and everything that caused it.

/// An error and its causes, `outer: inner: innermost`, each once: a cause
/// its parent already spelled out (transparent wrappers, messages that
/// embed their source) is not repeated.
pub fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("downloading `model.safetensors` from https://hub.example")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("reading /m: connection refused")]
    struct Repeats(#[source] Inner);

    #[test]
    fn each_cause_is_told_once() {
        assert_eq!(
            describe(&Outer(Inner)),
            "downloading `model.safetensors` from https://hub.example: connection refused"
        );
        assert_eq!(describe(&Repeats(Inner)), "reading /m: connection refused");
        let wrapped = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(describe(&wrapped), "connection refused");
    }
}
