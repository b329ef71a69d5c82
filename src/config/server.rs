//! The server part of the config file (owned by the server work).
