//! pkcs11
