#!/bin/sh
# Regenerates the test signing keys and their public JWKs (jwks.json).
# Run from this directory; tests only read the results (include_str!).
set -eu
for n in rsa rsa_rotated; do
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out $n.pem
done
for n in ec ec_rotated; do
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out $n.pem
done
for n in ed25519 ed25519_rotated; do
  openssl genpkey -algorithm ed25519 -out $n.pem
done
python3 - <<'PY'
import base64, hashlib, json, subprocess

def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

def spki(name):
    return subprocess.run(["openssl", "pkey", "-in", f"{name}.pem", "-pubout", "-outform", "DER"],
                          check=True, capture_output=True).stdout

out = {}
for name in ["rsa", "rsa_rotated", "ec", "ec_rotated", "ed25519", "ed25519_rotated"]:
    der = spki(name)
    kid = hashlib.sha1(der).hexdigest()  # 40 hex characters, like Google's kids
    if name.startswith("rsa"):
        mod = subprocess.run(["openssl", "rsa", "-in", f"{name}.pem", "-noout", "-modulus"],
                             check=True, capture_output=True, text=True).stdout.strip().split("=")[1]
        out[name] = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                     "n": b64(bytes.fromhex(mod)), "e": b64((65537).to_bytes(3, "big"))}
    elif name.startswith("ec"):
        point = der[-65:]
        assert point[0] == 4
        out[name] = {"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                     "x": b64(point[1:33]), "y": b64(point[33:])}
    else:
        out[name] = {"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid,
                     "x": b64(der[-32:])}
with open("jwks.json", "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
PY
