//! cradle's own flags on the kernel command line (`/proc/cmdline`).
//!
//! Flags with a dot (`cradle.debug`) are taken by the kernel as module
//! parameters: they are neither passed to init as arguments nor put in its
//! environment, so cradle reads the command line itself.

/// Where the kernel shows its command line.
const CMDLINE_PATH: &str = "/proc/cmdline";

/// Flags cradle understands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    /// `cradle.debug`: print per-step and per-module timings.
    pub debug: bool,
}

/// Reads the flags from `/proc/cmdline`; an unreadable file means defaults.
pub fn read_flags() -> Flags {
    std::fs::read_to_string(CMDLINE_PATH)
        .map(|cmdline| parse_flags(&cmdline))
        .unwrap_or_default()
}

/// Parses cradle's flags out of a kernel command line. `cradle.debug` and
/// `cradle.debug=1|y|yes|on|true` enable debug; `=0|n|no|off|false` disable it.
/// Everything after `--` belongs to init's argv, not to the kernel.
pub fn parse_flags(cmdline: &str) -> Flags {
    let mut flags = Flags::default();
    for word in cmdline.split_whitespace().take_while(|w| *w != "--") {
        let (key, value) = word.split_once('=').unwrap_or((word, "1"));
        if key == "cradle.debug" {
            flags.debug = !matches!(value, "0" | "n" | "no" | "off" | "false");
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_flags_bare_debug_enables_debug() {
        let flags = parse_flags("console=ttyS0 cradle.debug quiet\n");

        assert!(flags.debug);
    }

    #[test]
    fn parse_flags_debug_zero_disables_debug() {
        assert!(!parse_flags("cradle.debug=0").debug);
        assert!(parse_flags("cradle.debug=1").debug);
    }

    #[test]
    fn parse_flags_no_flag_is_default() {
        assert_eq!(
            parse_flags("console=ttyS0 reboot=k panic=1"),
            Flags::default()
        );
    }

    #[test]
    fn parse_flags_ignores_words_after_double_dash() {
        assert!(!parse_flags("quiet -- /bin/sh cradle.debug").debug);
    }

    #[test]
    fn parse_flags_ignores_similar_names() {
        assert!(!parse_flags("cradle.debugger cradle.debug_x=1").debug);
    }
}
