//! The ACPI power button. crib presses it (its GED device, an ACPI Notify on `PWRB`) when
//! the API asks for a graceful shutdown and the VM has no vsock device to send cradle the
//! shutdown call. The kernel's button driver turns the press into a `KEY_POWER` event on
//! an evdev node named "Power Button"; a thread of cradle's waits for it there and then
//! runs the caller's reaction once.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::console::say;

/// Where the kernel lists input devices, and where devtmpfs puts their nodes.
const INPUT_CLASS: &str = "/sys/class/input";
const DEV_INPUT: &str = "/dev/input";
/// The name drivers/acpi/button.c gives the power button's input device.
const BUTTON_NAME: &str = "Power Button";
/// linux/input-event-codes.h.
const EV_KEY: u16 = 0x01;
const KEY_POWER: u16 = 116;
/// A key press (0 is a release, 2 an autorepeat).
const KEY_PRESSED: i32 = 1;
/// `struct input_event` on 64-bit Linux: a `timeval` (two 8-byte fields), then type (u16),
/// code (u16) and value (i32).
const EVENT_BYTES: usize = 24;
/// devtmpfs creates nodes asynchronously; the button's is normally there before init.
const NODE_WAIT: Duration = Duration::from_secs(1);

/// The evdev node of the power button, if the kernel registered one (it needs ACPI, the
/// button driver and evdev; a kernel without them simply has no button).
fn find(class_dir: &Path, dev_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(class_dir).ok()?;
    entries.flatten().find_map(|entry| {
        let event = entry.file_name().to_string_lossy().into_owned();
        if !event.starts_with("event") {
            return None;
        }
        let name = std::fs::read_to_string(entry.path().join("device/name")).ok()?;
        (name.trim() == BUTTON_NAME).then(|| dev_dir.join(event))
    })
}

/// True if `event` (one `struct input_event`) is the power key going down.
fn is_power_press(event: &[u8; EVENT_BYTES]) -> bool {
    let kind = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == KEY_PRESSED
}

/// Reads events from `source` until the power key goes down (`Ok(true)`) or the source
/// ends (`Ok(false)`).
fn wait_for_press(source: &mut impl Read) -> io::Result<bool> {
    let mut event = [0u8; EVENT_BYTES];
    loop {
        match source.read_exact(&mut event) {
            Ok(()) if is_power_press(&event) => return Ok(true),
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// What happens on a press: the reaction may be given after the press came.
enum Reaction {
    /// Neither a press nor a reaction yet.
    Waiting,
    /// Pressed before a reaction was given: it runs as soon as one is.
    Pressed,
    Armed(Box<dyn FnOnce() + Send>),
    Done,
}

/// The power button, open from early in the boot: a press that comes before cradle knows
/// what to do about it (crib's graceful stop right after the ready marker, before the pod's
/// processes start) is kept, not lost (evdev gives events only to open readers).
pub struct Button {
    reaction: Arc<Mutex<Reaction>>,
}

impl Button {
    /// Opens the button's evdev node and starts the thread that waits for a press. `None`
    /// when the guest has no power button (or its node cannot be opened: one warning).
    pub fn open() -> Option<Self> {
        let node = find(Path::new(INPUT_CLASS), Path::new(DEV_INPUT))?;
        let start = std::time::Instant::now();
        let mut file = loop {
            match File::open(&node) {
                Ok(file) => break file,
                Err(_) if start.elapsed() < NODE_WAIT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    say!("warning: power button: cannot open {}: {e}", node.display());
                    return None;
                }
            }
        };
        let reaction = Arc::new(Mutex::new(Reaction::Waiting));
        let shared = reaction.clone();
        std::thread::Builder::new()
            .name("power-button".into())
            .spawn(move || match wait_for_press(&mut file) {
                Ok(true) => {
                    say!("power button pressed");
                    let mut state = lock(&shared);
                    match std::mem::replace(&mut *state, Reaction::Done) {
                        Reaction::Armed(react) => {
                            drop(state);
                            react();
                        }
                        _ => *state = Reaction::Pressed,
                    }
                }
                Ok(false) => say!("warning: power button: {} ended", node.display()),
                Err(e) => say!("warning: power button: reading {}: {e}", node.display()),
            })
            .ok()?;
        Some(Self { reaction })
    }

    /// Runs `react` on the press; at once if the button was already pressed.
    pub fn on_press(&self, react: impl FnOnce() + Send + 'static) {
        let mut state = lock(&self.reaction);
        match std::mem::replace(&mut *state, Reaction::Done) {
            Reaction::Pressed => {
                drop(state);
                react();
            }
            Reaction::Done => {}
            Reaction::Waiting | Reaction::Armed(_) => *state = Reaction::Armed(Box::new(react)),
        }
    }
}

fn lock(reaction: &Mutex<Reaction>) -> std::sync::MutexGuard<'_, Reaction> {
    reaction
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn a_press_before_the_reaction_runs_it_when_given() {
        let button = Button {
            reaction: Arc::new(Mutex::new(Reaction::Pressed)),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        button.on_press(move || tx.send(()).unwrap());
        assert!(rx.try_recv().is_ok(), "ran at once");
        assert!(matches!(*lock(&button.reaction), Reaction::Done));
    }

    #[test]
    fn a_reaction_before_the_press_waits_for_it() {
        let button = Button {
            reaction: Arc::new(Mutex::new(Reaction::Waiting)),
        };
        button.on_press(|| panic!("not pressed yet"));
        assert!(matches!(*lock(&button.reaction), Reaction::Armed(_)));
    }

    fn event(kind: u16, code: u16, value: i32) -> [u8; EVENT_BYTES] {
        let mut bytes = [0u8; EVENT_BYTES];
        bytes[..16].fill(0x5a); // the timestamp must not matter
        bytes[16..18].copy_from_slice(&kind.to_ne_bytes());
        bytes[18..20].copy_from_slice(&code.to_ne_bytes());
        bytes[20..].copy_from_slice(&value.to_ne_bytes());
        bytes
    }

    #[test]
    fn event_size_matches_the_kernel_struct() {
        assert_eq!(EVENT_BYTES, std::mem::size_of::<libc::input_event>());
    }

    #[test]
    fn only_a_power_key_press_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, KEY_PRESSED)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 2)), "autorepeat");
        assert!(
            !is_power_press(&event(EV_KEY, 115, KEY_PRESSED)),
            "another key"
        );
        assert!(!is_power_press(&event(0, KEY_POWER, KEY_PRESSED)), "EV_SYN");
    }

    #[test]
    fn waits_past_other_events_for_the_press() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&event(0, 0, 0));
        stream.extend_from_slice(&event(EV_KEY, KEY_POWER, 0));
        stream.extend_from_slice(&event(EV_KEY, KEY_POWER, KEY_PRESSED));
        assert!(wait_for_press(&mut stream.as_slice()).unwrap());
    }

    #[test]
    fn a_stream_that_ends_or_breaks_mid_event_is_no_press() {
        let mut stream = event(EV_KEY, 115, KEY_PRESSED).to_vec();
        stream.extend_from_slice(&event(EV_KEY, KEY_POWER, KEY_PRESSED)[..10]);
        assert!(!wait_for_press(&mut stream.as_slice()).unwrap());
    }

    #[test]
    fn finds_the_button_among_input_devices() {
        let dir = TempDir::new("power-button");
        let class = dir.path().join("class");
        for (event, name) in [("event0", "AT Keyboard\n"), ("event1", "Power Button\n")] {
            std::fs::create_dir_all(class.join(event).join("device")).unwrap();
            std::fs::write(class.join(event).join("device/name"), name).unwrap();
        }
        // input3 is the device itself, not an event node.
        std::fs::create_dir_all(class.join("input3/device")).unwrap();
        std::fs::write(class.join("input3/device/name"), "Power Button\n").unwrap();
        assert_eq!(
            find(&class, Path::new("/dev/input")),
            Some(PathBuf::from("/dev/input/event1"))
        );
    }

    #[test]
    fn no_button_without_input_devices() {
        let dir = TempDir::new("power-button-none");
        assert_eq!(find(&dir.path().join("missing"), Path::new("/dev")), None);
        assert_eq!(find(dir.path(), Path::new("/dev")), None);
    }
}
