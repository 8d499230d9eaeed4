//! Text from peers (client names, server messages), made safe to show.

use std::borrow::Cow;

/// `text` from a peer, safe to put in a log line, a terminal or a counter
/// name: control characters and other characters that do not print (line
/// breaks, escape sequences, bidirectional overrides, zero-width spaces)
/// become Rust escapes such as `\n` and `\u{1b}`, and a backslash becomes
/// `\\`, so that an escape in the output always comes from here.
pub fn printable(text: &str) -> Cow<'_, str> {
    let plain = |c: char| matches!(c, '"' | '\'') || c.escape_debug().len() == 1;
    if text.chars().all(plain) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if plain(c) {
            out.push(c);
        } else {
            out.extend(c.escape_debug());
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn printable_escapes_what_could_forge_output() {
        assert!(matches!(printable("mirror tail é \"q\""), Cow::Borrowed(_)));
        assert_eq!(printable("a\nkernel: seen=1"), "a\\nkernel: seen=1");
        assert_eq!(printable("\r\t\u{1b}[2J"), "\\r\\t\\u{1b}[2J");
        assert_eq!(
            printable("\u{202e}\u{200b}\u{85}\u{7f}"),
            "\\u{202e}\\u{200b}\\u{85}\\u{7f}"
        );
        // A backslash is doubled, so an escape in the output always comes
        // from here.
        assert_eq!(printable("\\n"), "\\\\n");
    }

    proptest! {
        /// Whatever the text, the printable form has no control character.
        #[test]
        fn printable_output_has_no_control_characters(text in any::<String>()) {
            let shown = printable(&text);
            prop_assert!(shown.chars().all(|c| !c.is_control()));
        }
    }
}
