#!/usr/bin/env node
// Signal-protocol test peer for custodian interoperability tests.
//
// A long-lived process that plays one consumer device using libsignal-node
// (npm "libsignal", the implementation WhatsApp Web clients use). It reads
// newline-delimited JSON requests on stdin and writes exactly one
// newline-delimited JSON response per request on stdout, in order. Binary
// values are standard base64 (with padding). Everything else (logs, and
// libsignal's own console chatter) goes to stderr. See README.md.
'use strict';

// stdout carries the protocol and nothing else. Redirect every console method
// to stderr *before* libsignal is loaded (it calls console.info/warn/error).
const { Console } = require('console');
{
    const errConsole = new Console({ stdout: process.stderr, stderr: process.stderr });
    for (const name of Object.keys(Console.prototype)) {
        if (typeof errConsole[name] === 'function') {
            console[name] = errConsole[name].bind(errConsole);
        }
    }
}

const readline = require('readline');
const libsignal = require('libsignal');
const curveJs = require('curve25519-js');

const { keyhelper, ProtocolAddress, SessionBuilder, SessionCipher, SessionRecord } = libsignal;

const log = (...args) => process.stderr.write(`[peer ${process.pid}] ${args.join(' ')}\n`);

/** Malformed request, unknown command, or command issued in the wrong state. */
class RequestError extends Error {
    constructor(message) {
        super(message);
        this.name = 'RequestError';
    }
}

/** The signed prekey signature in a bundle does not verify (checked by the peer, see initOutgoing). */
class BadSignatureError extends Error {
    constructor(message) {
        super(message);
        this.name = 'BadSignatureError';
    }
}

// ---------------------------------------------------------------------------
// Encoding helpers

const B64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

function b64decode(value, field) {
    if (typeof value !== 'string' || !B64_RE.test(value)) {
        throw new RequestError(`${field}: expected a standard base64 string`);
    }
    return Buffer.from(value, 'base64');
}

function b64encode(buf) {
    return Buffer.from(buf).toString('base64');
}

/** libsignal has returned the ciphertext body as a "binary" string in some versions, a Buffer in others. */
function toBytes(body) {
    if (Buffer.isBuffer(body)) return body;
    if (typeof body === 'string') return Buffer.from(body, 'binary');
    if (body instanceof Uint8Array) return Buffer.from(body.buffer, body.byteOffset, body.byteLength);
    if (body instanceof ArrayBuffer) return Buffer.from(body);
    throw new TypeError(`unexpected ciphertext body type: ${typeof body}`);
}

function publicKey(value, field) {
    const key = b64decode(value, field);
    if (key.length !== 33 || key[0] !== 0x05) {
        throw new RequestError(`${field}: expected a 33-byte 0x05-prefixed public key, got ${key.length} bytes`);
    }
    return key;
}

function uint(value, field, { optional = false, def } = {}) {
    if (value === undefined || value === null) {
        if (optional) return def;
        throw new RequestError(`${field}: required`);
    }
    if (!Number.isSafeInteger(value) || value < 0) {
        throw new RequestError(`${field}: expected a non-negative integer`);
    }
    return value;
}

function address(req) {
    if (typeof req.name !== 'string' || req.name === '' || req.name.includes('.')) {
        throw new RequestError('name: expected a non-empty string without "."');
    }
    return new ProtocolAddress(req.name, uint(req.deviceId, 'deviceId'));
}

// ---------------------------------------------------------------------------
// In-memory device state and the storage interface libsignal expects.

let state = null; // set by "init"

function newState({ registrationId, signedPreKeyId, preKeys }) {
    const identityKeyPair = keyhelper.generateIdentityKeyPair();
    const signedPreKey = keyhelper.generateSignedPreKey(identityKeyPair, signedPreKeyId);
    const preKeyMap = new Map();
    for (let id = 1; id <= preKeys; id++) {
        preKeyMap.set(id, keyhelper.generatePreKey(id).keyPair);
    }
    return {
        registrationId,
        identityKeyPair,
        signedPreKey, // {keyId, keyPair, signature}
        preKeys: preKeyMap, // keyId -> {pubKey, privKey}; consumed ones are deleted
        handedOut: new Set(), // one-time prekey ids already given out in a bundle
        sessions: new Map(), // "name.deviceId" -> serialized SessionRecord (JSON string)
        identities: new Map(), // name -> remote identity key (Buffer), latest seen by a successful command
        pendingIdentities: new Map(), // identities seen during the current command; committed on success
    };
}

function requireState() {
    if (!state) throw new RequestError('not initialized: send "init" first');
    return state;
}

// libsignal passes the bare name (addr.id) to isTrustedIdentity from
// SessionBuilder.initOutgoing / SessionCipher.encrypt / decryptWhisperMessage,
// but the full "name.deviceId" string from SessionBuilder.initIncoming.
// Normalise to the name (ProtocolAddress forbids "." inside a name).
function identityName(identifier) {
    return String(identifier).split('.')[0];
}

const storage = {
    // Sessions are stored serialized and deserialized on every load, like a
    // real persistent store: a decrypt that fails part-way (bad MAC after the
    // ratchet was advanced / a message key was deleted) is not stored and so
    // leaves the session untouched.
    async loadSession(id) {
        const s = requireState().sessions.get(id);
        return s === undefined ? undefined : SessionRecord.deserialize(JSON.parse(s));
    },
    async storeSession(id, record) {
        requireState().sessions.set(id, JSON.stringify(record.serialize()));
    },
    // Trust on first use, but accept any key and remember the latest one.
    // libsignal calls this before the message is authenticated, so the key is
    // only staged here and committed once the whole command succeeded (a
    // forged/garbled PreKeyWhisperMessage must not overwrite the bookkeeping).
    async isTrustedIdentity(identifier, identityKey) {
        requireState().pendingIdentities.set(identityName(identifier), Buffer.from(identityKey));
        return true;
    },
    async loadPreKey(id) {
        const kp = requireState().preKeys.get(id);
        return kp === undefined ? undefined : { pubKey: kp.pubKey, privKey: kp.privKey };
    },
    async removePreKey(id) {
        requireState().preKeys.delete(id);
    },
    async loadSignedPreKey(id) {
        const spk = requireState().signedPreKey;
        return spk.keyId === id ? { pubKey: spk.keyPair.pubKey, privKey: spk.keyPair.privKey } : undefined;
    },
    async getOurRegistrationId() {
        return requireState().registrationId;
    },
    async getOurIdentity() {
        const kp = requireState().identityKeyPair;
        return { pubKey: kp.pubKey, privKey: kp.privKey };
    },
};

// ---------------------------------------------------------------------------
// Commands

function generateRegistrationId() {
    let id;
    do {
        id = keyhelper.generateRegistrationId();
    } while (id === 0);
    return id;
}

function parseBundle(b) {
    if (!b || typeof b !== 'object') throw new RequestError('bundle: required');
    const spk = b.signedPreKey;
    if (!spk || typeof spk !== 'object') throw new RequestError('bundle.signedPreKey: required');
    const signature = b64decode(spk.signature, 'bundle.signedPreKey.signature');
    if (signature.length !== 64) {
        throw new RequestError(`bundle.signedPreKey.signature: expected 64 bytes, got ${signature.length}`);
    }
    let preKey = null;
    if (b.preKey !== undefined && b.preKey !== null) {
        if (typeof b.preKey !== 'object') throw new RequestError('bundle.preKey: expected object or null');
        preKey = {
            keyId: uint(b.preKey.keyId, 'bundle.preKey.keyId'),
            publicKey: publicKey(b.preKey.publicKey, 'bundle.preKey.publicKey'),
        };
    }
    return {
        registrationId: uint(b.registrationId, 'bundle.registrationId'),
        identityKey: publicKey(b.identityKey, 'bundle.identityKey'),
        signedPreKey: {
            keyId: uint(spk.keyId, 'bundle.signedPreKey.keyId'),
            publicKey: publicKey(spk.publicKey, 'bundle.signedPreKey.publicKey'),
            signature,
        },
        preKey,
    };
}

const commands = {
    async init(req) {
        const registrationId = uint(req.registrationId, 'registrationId', { optional: true, def: undefined });
        const signedPreKeyId = uint(req.signedPreKeyId, 'signedPreKeyId', { optional: true, def: 1 });
        const preKeys = uint(req.preKeys, 'preKeys', { optional: true, def: 10 });
        state = newState({
            registrationId: registrationId === undefined ? generateRegistrationId() : registrationId,
            signedPreKeyId,
            preKeys,
        });
        return { identityKey: b64encode(state.identityKeyPair.pubKey), registrationId: state.registrationId };
    },

    async bundle() {
        const st = requireState();
        let preKey = null;
        const ids = [...st.preKeys.keys()].filter((id) => !st.handedOut.has(id)).sort((a, b) => a - b);
        if (ids.length > 0) {
            const id = ids[0];
            st.handedOut.add(id);
            preKey = { keyId: id, publicKey: b64encode(st.preKeys.get(id).pubKey) };
        }
        return {
            registrationId: st.registrationId,
            identityKey: b64encode(st.identityKeyPair.pubKey),
            signedPreKey: {
                keyId: st.signedPreKey.keyId,
                publicKey: b64encode(st.signedPreKey.keyPair.pubKey),
                signature: b64encode(st.signedPreKey.signature),
            },
            preKey,
        };
    },

    async initOutgoing(req) {
        requireState();
        const addr = address(req);
        const bundle = parseBundle(req.bundle);
        // libsignal-node 6.0.0 does NOT verify the signed prekey signature in
        // initOutgoing (curve.verifySignature(..., isInit=true) returns true
        // unconditionally). Verify it here unless explicitly disabled.
        if (req.verifySignature !== false) {
            const ok = curveJs.verify(bundle.identityKey.subarray(1), bundle.signedPreKey.publicKey,
                                      bundle.signedPreKey.signature);
            if (!ok) throw new BadSignatureError('signed prekey signature does not verify against identity key');
        }
        await new SessionBuilder(storage, addr).initOutgoing(bundle);
        return {};
    },

    async encrypt(req) {
        requireState();
        const addr = address(req);
        const plaintext = b64decode(req.plaintext, 'plaintext');
        const res = await new SessionCipher(storage, addr).encrypt(plaintext);
        return { type: res.type, body: b64encode(toBytes(res.body)) };
    },

    async decrypt(req) {
        requireState();
        const addr = address(req);
        const body = b64decode(req.body, 'body');
        const cipher = new SessionCipher(storage, addr);
        let plaintext;
        if (req.type === 3) {
            plaintext = await cipher.decryptPreKeyWhisperMessage(body);
        } else if (req.type === 1 || req.type === 2) {
            // 1 is what libsignal-node emits; 2 is libsignal (Rust/Java) CiphertextMessageType::Whisper.
            plaintext = await cipher.decryptWhisperMessage(body);
        } else {
            throw new RequestError('type: expected 3 (PreKeyWhisperMessage) or 1 (WhisperMessage)');
        }
        return { plaintext: b64encode(plaintext) };
    },

    async hasSession(req) {
        requireState();
        const addr = address(req);
        return { value: await new SessionCipher(storage, addr).hasOpenSession() };
    },

    async identity(req) {
        const st = requireState();
        if (typeof req.name !== 'string') throw new RequestError('name: expected a string');
        const key = st.identities.get(req.name);
        return { identityKey: key === undefined ? null : b64encode(key) };
    },

    async exit() {
        return {};
    },
};

// ---------------------------------------------------------------------------
// Request loop

function writeResponse(obj) {
    return new Promise((resolve) => {
        process.stdout.write(JSON.stringify(obj) + '\n', () => resolve());
    });
}

async function handle(line) {
    let req;
    try {
        req = JSON.parse(line);
    } catch (e) {
        return { response: { id: null, ok: false, error: `invalid JSON: ${e.message}`, kind: 'RequestError' } };
    }
    const id = req !== null && typeof req === 'object' && 'id' in req ? req.id : null;
    try {
        if (req === null || typeof req !== 'object' || Array.isArray(req)) {
            throw new RequestError('request must be a JSON object');
        }
        if (typeof req.cmd !== 'string' || !Object.prototype.hasOwnProperty.call(commands, req.cmd)) {
            throw new RequestError(`unknown cmd: ${JSON.stringify(req.cmd)}`);
        }
        if (state) state.pendingIdentities.clear();
        const result = await commands[req.cmd](req);
        if (state) {
            for (const [name, key] of state.pendingIdentities) state.identities.set(name, key);
            state.pendingIdentities.clear();
        }
        return { response: Object.assign({ id, ok: true }, result), exit: req.cmd === 'exit' };
    } catch (e) {
        const kind = (e && e.constructor && e.constructor.name) || (e && e.name) || 'Error';
        const error = (e && (e.message || e.name)) || String(e);
        log(`cmd ${req && req.cmd} (id ${id}) failed: ${kind}: ${error}`);
        return { response: { id, ok: false, error, kind } };
    }
}

process.on('uncaughtException', (e) => log('uncaught exception:', (e && e.stack) || e));
process.on('unhandledRejection', (e) => log('unhandled rejection:', (e && e.stack) || e));
// A consumer that goes away must not take us down with EPIPE.
process.stdout.on('error', (e) => {
    log('stdout error:', e.message);
    process.exit(0);
});

async function main() {
    const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity, terminal: false });
    for await (const raw of rl) {
        const line = raw.trim();
        if (line === '') continue;
        const { response, exit } = await handle(line);
        await writeResponse(response);
        if (exit) process.exit(0);
    }
    process.exit(0); // EOF
}

main().catch((e) => {
    log('fatal:', (e && e.stack) || e);
    process.exit(1);
});
