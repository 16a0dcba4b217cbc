//! Certificates for tests and benchmarks: a certificate authority of
//! their own, and certificates it signs.

use std::path::PathBuf;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};

use super::unique;

/// A certificate authority made for one test, and certificates it signs.
pub struct TestCa {
    pub dir: PathBuf,
    key: PKey<Private>,
    cert: X509,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let dir = std::env::temp_dir().join(unique(&format!("pipes-{name}-")));
        std::fs::create_dir_all(&dir).unwrap();
        let key = ec_key();
        let mut builder = cert_builder(&key, "Pipes test CA", 3650);
        builder.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
        builder.set_issuer_name(builder_name("Pipes test CA").as_ref()).unwrap();
        builder.sign(&key, MessageDigest::sha256()).unwrap();
        let cert = builder.build();
        std::fs::write(dir.join("ca.pem"), cert.to_pem().unwrap()).unwrap();
        TestCa { dir, key, cert }
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Signs a certificate for `dns` names (and 127.0.0.1); returns the
    /// chain and key files.
    pub fn issue(&self, file: &str, dns: &[&str]) -> (PathBuf, PathBuf) {
        let key = ec_key();
        let mut builder = cert_builder(&key, dns[0], 30);
        builder.set_issuer_name(self.cert.subject_name()).unwrap();
        let mut san = SubjectAlternativeName::new();
        for name in dns {
            san.dns(name);
        }
        san.ip("127.0.0.1");
        let san = san.build(&builder.x509v3_context(Some(&self.cert), None)).unwrap();
        builder.append_extension(san).unwrap();
        builder.sign(&self.key, MessageDigest::sha256()).unwrap();
        let (cert, key_file) = (self.dir.join(format!("{file}.pem")), self.dir.join(format!("{file}.key")));
        std::fs::write(&cert, builder.build().to_pem().unwrap()).unwrap();
        std::fs::write(&key_file, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        (cert, key_file)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ec_key() -> PKey<Private> {
    PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap()).unwrap()
}

fn builder_name(cn: &str) -> openssl::x509::X509Name {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    name.build()
}

fn cert_builder(key: &PKey<Private>, cn: &str, days: u32) -> openssl::x509::X509Builder {
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    builder.set_serial_number(&serial.to_asn1_integer().unwrap()).unwrap();
    builder.set_subject_name(builder_name(cn).as_ref()).unwrap();
    builder.set_pubkey(key).unwrap();
    builder.set_not_before(Asn1Time::days_from_now(0).unwrap().as_ref()).unwrap();
    builder.set_not_after(Asn1Time::days_from_now(days).unwrap().as_ref()).unwrap();
    builder
}
