//! Helpers for the Prometheus text format that every module exporting metrics shares.

/// Escapes a label value (backslash, quote, newline) for the Prometheus text format.
pub(crate) fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
