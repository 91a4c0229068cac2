//! What the user asks for: the VM configuration and the parsing of its CLI values.
//! Every error names the option and how to fix it.

use std::path::PathBuf;

/// Smallest guest RAM crib accepts: below this a Linux kernel cannot even decompress.
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// Largest vCPU count: LAPIC IDs are 8-bit in the MADT entries crib writes.
pub const MAX_CPUS: u8 = 254;
/// The command line used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// crib's stdout (and stdin to the guest).
    Stdout,
    /// Discarded.
    Off,
    /// Appended to a file.
    File(PathBuf),
}

/// A whole VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory_bytes: u64,
    pub console: ConsoleConfig,
}

/// Errors in the configuration, each naming the option.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus must be between 1 and {MAX_CPUS}, got {0}")]
    Cpus(u64),
    #[error(
        "--memory '{0}' is not a size: use a number with an optional K, M or G suffix, e.g. 512M"
    )]
    MemorySyntax(String),
    #[error("--memory {0} bytes is too small: give at least 16M")]
    MemoryTooSmall(u64),
    #[error("--memory {0} bytes is too large for this host's address space")]
    MemoryTooLarge(u64),
    #[error("--console '{0}' is not valid: use stdout, off or file=PATH")]
    Console(String),
}

/// Parses a size such as `512M`, `1G`, `65536`, `4096K` (binary units).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::MemorySyntax(text.to_string());
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((i, 'k' | 'K')) => (&trimmed[..i], 10),
        Some((i, 'm' | 'M')) => (&trimmed[..i], 20),
        Some((i, 'g' | 'G')) => (&trimmed[..i], 30),
        Some(_) => (trimmed, 0),
        None => return Err(err()),
    };
    let value: u64 = digits.parse().map_err(|_| err())?;
    value.checked_mul(1u64 << shift).ok_or_else(err)
}

/// Validates a memory size.
pub fn parse_memory(text: &str) -> Result<u64, ConfigError> {
    let bytes = parse_size(text)?;
    if bytes < MIN_MEMORY_BYTES {
        return Err(ConfigError::MemoryTooSmall(bytes));
    }
    // The guest's RAM must be mappable in crib's own address space (47 bits of user space);
    // leave half of it for everything else.
    if bytes > (1u64 << 46) {
        return Err(ConfigError::MemoryTooLarge(bytes));
    }
    Ok(bytes)
}

/// Validates a vCPU count.
pub fn parse_cpus(count: u64) -> Result<u8, ConfigError> {
    u8::try_from(count)
        .ok()
        .filter(|c| (1..=MAX_CPUS).contains(c))
        .ok_or(ConfigError::Cpus(count))
}

/// Parses `stdout`, `off` or `file=PATH`.
pub fn parse_console(text: &str) -> Result<ConsoleConfig, ConfigError> {
    match text {
        "stdout" => Ok(ConsoleConfig::Stdout),
        "off" => Ok(ConsoleConfig::Off),
        _ => match text.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(path))),
            _ => Err(ConfigError::Console(text.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_suffixes_are_binary() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn size_garbage_is_a_syntax_error() {
        assert_eq!(
            parse_size("lots"),
            Err(ConfigError::MemorySyntax("lots".into()))
        );
        assert_eq!(parse_size(""), Err(ConfigError::MemorySyntax("".into())));
        assert_eq!(parse_size("M"), Err(ConfigError::MemorySyntax("M".into())));
    }

    #[test]
    fn size_overflow_is_a_syntax_error() {
        assert!(parse_size("99999999999999999G").is_err());
    }

    #[test]
    fn memory_below_minimum_is_too_small() {
        assert_eq!(
            parse_memory("1M"),
            Err(ConfigError::MemoryTooSmall(1 << 20))
        );
    }

    #[test]
    fn memory_beyond_address_space_is_too_large() {
        assert!(matches!(
            parse_memory("1000000G"),
            Err(ConfigError::MemoryTooLarge(_))
        ));
    }

    #[test]
    fn zero_cpus_is_refused() {
        assert_eq!(parse_cpus(0), Err(ConfigError::Cpus(0)));
        assert_eq!(parse_cpus(300), Err(ConfigError::Cpus(300)));
        assert_eq!(parse_cpus(2), Ok(2));
    }

    #[test]
    fn console_forms_parse() {
        assert_eq!(parse_console("off"), Ok(ConsoleConfig::Off));
        assert_eq!(
            parse_console("file=/tmp/c"),
            Ok(ConsoleConfig::File("/tmp/c".into()))
        );
        assert_eq!(
            parse_console("file="),
            Err(ConfigError::Console("file=".into()))
        );
        assert_eq!(
            parse_console("tty"),
            Err(ConfigError::Console("tty".into()))
        );
    }
}
