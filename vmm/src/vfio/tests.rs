use std::os::unix::fs::symlink;

use super::*;

fn bdf(text: &str) -> Bdf {
    text.parse().unwrap()
}

#[test]
fn bdf_parses_long_and_short_forms() {
    assert_eq!(
        bdf("0000:00:04.0"),
        Bdf {
            domain: 0,
            bus: 0,
            device: 4,
            function: 0
        }
    );
    assert_eq!(bdf("00:1f.7").to_string(), "0000:00:1f.7");
    assert_eq!(bdf("0000:ab:1F.3").to_string(), "0000:ab:1f.3");
    assert_eq!(bdf("ffff:ff:1f.7").domain, 0xffff);
}

#[test]
fn bad_bdf_is_refused_with_the_expected_form() {
    for text in [
        "",
        "0000:00:04",
        "00:04",
        "0000:00:20.0",
        "0000:00:04.8",
        "x:00:04.0",
        "00000:00:04.0",
        "0:0:0:0.0",
        "0000:000:04.0",
        "0000:00:04.0 ",
    ] {
        let err = text.parse::<Bdf>().unwrap_err();
        assert!(
            err.to_string().contains("DOMAIN:BUS:DEVICE.FUNCTION"),
            "{text}: {err}"
        );
    }
}

#[test]
fn bdf_round_trips_through_json() {
    let value: Bdf = serde_json::from_str("\"0000:00:04.0\"").unwrap();
    assert_eq!(serde_json::to_string(&value).unwrap(), "\"0000:00:04.0\"");
    assert!(serde_json::from_str::<Bdf>("\"nope\"").is_err());
}

/// A fake /sys with one IOMMU group holding the given devices (name, driver).
struct FakeSysfs {
    root: PathBuf,
}

impl FakeSysfs {
    fn new(name: &str, iommu: bool, members: &[(&str, Option<&str>)]) -> Self {
        let root = std::env::temp_dir().join(format!("crib-vfio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let devices = root.join("bus/pci/devices");
        let drivers = root.join("bus/pci/drivers");
        let group = root.join("kernel/iommu_groups/7/devices");
        std::fs::create_dir_all(&devices).unwrap();
        std::fs::create_dir_all(root.join("kernel/iommu_groups")).unwrap();
        if iommu {
            std::fs::create_dir_all(&group).unwrap();
        }
        for (member, driver) in members {
            let dir = devices.join(member);
            std::fs::create_dir_all(&dir).unwrap();
            if iommu {
                symlink(root.join("kernel/iommu_groups/7"), dir.join("iommu_group")).unwrap();
                symlink(&dir, group.join(member)).unwrap();
            }
            if let Some(driver) = driver {
                let d = drivers.join(driver);
                std::fs::create_dir_all(&d).unwrap();
                symlink(&d, dir.join("driver")).unwrap();
            }
        }
        Self { root }
    }
}

impl Drop for FakeSysfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

const DEV: &str = "0000:00:04.0";

#[test]
fn device_bound_to_vfio_in_its_own_group_passes() {
    let sysfs = FakeSysfs::new("ok", true, &[(DEV, Some("vfio-pci"))]);
    assert_eq!(check_host(&sysfs.root, &bdf(DEV)).unwrap(), 7);
}

#[test]
fn missing_device_names_lspci() {
    let sysfs = FakeSysfs::new("missing", true, &[(DEV, Some("vfio-pci"))]);
    let err = check_host(&sysfs.root, &bdf("0000:00:05.0")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("PCI device 0000:00:05.0 does not exist"),
        "{text}"
    );
    assert!(text.contains("lspci -D"), "{text}");
}

#[test]
fn no_iommu_names_the_kernel_options() {
    let sysfs = FakeSysfs::new("noiommu", false, &[(DEV, Some("nvme"))]);
    let text = check_host(&sysfs.root, &bdf(DEV)).unwrap_err().to_string();
    assert!(text.contains("has no IOMMU"), "{text}");
    assert!(text.contains("intel_iommu=on iommu=pt"), "{text}");
}

#[test]
fn device_on_another_driver_says_how_to_bind_vfio_pci() {
    let sysfs = FakeSysfs::new("nvme", true, &[(DEV, Some("nvme"))]);
    let text = check_host(&sysfs.root, &bdf(DEV)).unwrap_err().to_string();
    assert!(text.contains("is bound to nvme, not vfio-pci"), "{text}");
    assert!(
        text.contains("echo vfio-pci > /sys/bus/pci/devices/0000:00:04.0/driver_override; echo 0000:00:04.0 > /sys/bus/pci/drivers_probe"),
        "{text}"
    );
    let unbound = FakeSysfs::new("unbound", true, &[(DEV, None)]);
    let text = check_host(&unbound.root, &bdf(DEV))
        .unwrap_err()
        .to_string();
    assert!(text.contains("is bound to no driver"), "{text}");
}

#[test]
fn group_with_a_bound_neighbour_is_not_viable() {
    let sysfs = FakeSysfs::new(
        "group",
        true,
        &[
            (DEV, Some("vfio-pci")),
            ("0000:00:04.1", Some("e1000e")),
            ("0000:00:04.2", None),
            ("0000:00:1c.0", Some("pcieport")),
        ],
    );
    let text = check_host(&sysfs.root, &bdf(DEV)).unwrap_err().to_string();
    assert!(
        text.contains("IOMMU group 7 of PCI device 0000:00:04.0 is not viable"),
        "{text}"
    );
    assert!(text.contains("0000:00:04.1 (bound to e1000e)"), "{text}");
    assert!(!text.contains("04.2") && !text.contains("1c.0"), "{text}");
}

#[test]
fn busy_group_says_who_holds_it() {
    let source = vfio_ioctls::VfioError::OpenGroup(
        std::io::Error::from_raw_os_error(libc::EBUSY),
        "7".into(),
    );
    let text = open_error(&bdf(DEV), 7, source).to_string();
    assert!(text.contains("is in use"), "{text}");
    assert!(text.contains("/dev/vfio/7"), "{text}");
}

#[test]
fn subtract_cuts_holes_out_of_areas() {
    assert_eq!(
        subtract(&[(0, 0x4000)], (0x2000, 0x1000)),
        vec![(0, 0x2000), (0x3000, 0x1000)]
    );
    assert_eq!(subtract(&[(0, 0x4000)], (0, 0x4000)), vec![]);
    assert_eq!(
        subtract(&[(0x1000, 0x1000)], (0x3000, 0x1000)),
        vec![(0x1000, 0x1000)]
    );
}
