// Package keybroker releases a vTPM backend's keys only on evidence: the
// backend's master key (from which every instance's state key is derived)
// and its migration domain's key (which seals state in transit between
// backends). It is the KBS flow of confidential computing (attest, then
// receive the secret), served by `cvtpm ca` beside the EK CA, with its
// records in the CA's database.
//
// The backend draws an ephemeral P-256 ECDH key and asks for a nonce; its
// CSV report's report_data commits to the nonce, its backend id, the
// migration domain, the ephemeral public key and the wrapping cipher
// (ReportData). The broker verifies the report against its evidence policy
// (trusted roots, approved measurements, policy bits, chips), wraps the keys
// to the ephemeral key (ECDH, HKDF-SHA256, AES-256-GCM or SM4-GCM) and
// signs the whole answer with the CA key, so that a host in the middle can
// neither read the keys nor hand the backend keys of its own.
//
// The broker also keeps each instance's highest state generation (its
// anchor). A backend reports generations as its instances write state and
// gets them back with its keys: an instance whose sealed directory is
// older than its anchor was rolled back by whoever holds the disk.
package keybroker

import (
	"crypto"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/emmansun/gmsm/sm2"

	"cvtpm/internal/gcm"
)

// KeySize is the size of each released key.
const KeySize = 32

const label = "cvtpm key release v1"

func appendLV(dst, v []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(v)))
	return append(dst, v...)
}

// ReportData is what the backend's CSV report commits to.
func ReportData(nonce []byte, backendID, domain string, ephemeralPublic []byte, cipherName string) [64]byte {
	b := []byte(label)
	for _, v := range [][]byte{nonce, []byte(backendID), []byte(domain), ephemeralPublic, []byte(cipherName)} {
		b = appendLV(b, v)
	}
	return sha512.Sum512(b)
}

// Transcript is what the broker signs: the request's binding, its own
// ephemeral key, the wrapped keys and the anchors.
func Transcript(reportData [64]byte, brokerPublic, wrapped []byte, anchors map[string]uint64, moved map[string]string, lease []byte, lastCounter uint64) []byte {
	b := appendLV([]byte(label+" response"), reportData[:])
	b = appendLV(b, lease)
	b = binary.BigEndian.AppendUint64(b, lastCounter)
	b = appendLV(b, brokerPublic)
	b = appendLV(b, wrapped)
	b = appendAnchors(b, anchors)
	ids := make([]string, 0, len(moved))
	for id := range moved {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		b = appendLV(appendLV(b, []byte(id)), []byte(moved[id]))
	}
	return b
}

func appendAnchors(b []byte, anchors map[string]uint64) []byte {
	ids := make([]string, 0, len(anchors))
	for id := range anchors {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	b = binary.BigEndian.AppendUint32(b, uint32(len(ids)))
	for _, id := range ids {
		b = appendLV(b, []byte(id))
		b = binary.BigEndian.AppendUint64(b, anchors[id])
	}
	return b
}

// wrapAEAD derives the one-time wrapping AEAD from the ECDH secret.
func wrapAEAD(shared, nonce []byte, cipherName string) (cipher.AEAD, error) {
	size := gcm.KeySize(cipherName)
	if size == 0 {
		return nil, fmt.Errorf("wrapping cipher %q: want %s or %s", cipherName, gcm.AES256, gcm.SM4)
	}
	k, err := hkdf.Key(sha256.New, shared, nonce, label+" wrap "+cipherName, size)
	if err != nil {
		return nil, err
	}
	return gcm.New(cipherName, k)
}

// The wrapping key is used once, so a zero nonce is safe.
var zeroNonce = make([]byte, 12)

// AnchorMAC authenticates an anchor update with a key derived from the
// backend's master key: only a backend the broker released keys to can
// move its anchors.
func AnchorMAC(masterKey []byte, backendID, domain string, lease []byte, counter uint64, gens map[string]uint64) ([]byte, error) {
	b := appendLV(appendLV(appendLV([]byte("anchor"), []byte(backendID)), []byte(domain)), lease)
	b = binary.BigEndian.AppendUint64(b, counter)
	return requestMAC(masterKey, appendAnchors(b, gens))
}

// ClaimMAC authenticates a claim the same way.
func ClaimMAC(masterKey []byte, backendID, domain, instance string, gen uint64) ([]byte, error) {
	b := appendLV(appendLV(appendLV([]byte("claim"), []byte(backendID)), []byte(domain)), []byte(instance))
	return requestMAC(masterKey, binary.BigEndian.AppendUint64(b, gen))
}

func requestMAC(masterKey, msg []byte) ([]byte, error) {
	k, err := hkdf.Key(sha256.New, masterKey, nil, "cvtpm anchor v1", 32)
	if err != nil {
		return nil, err
	}
	m := hmac.New(sha256.New, k)
	m.Write(msg)
	return m.Sum(nil), nil
}

// scope names where an instance's anchor lives: its migration domain, so
// that the backends of a domain see one anchor and one owner per instance,
// or the backend itself.
func scope(backendID, domain string) string {
	if domain != "" {
		return "domain/" + domain
	}
	return "backend/" + backendID
}

// sign signs msg with the CA key: ECDSA or RSA over SHA-256, or SM2 with
// SM3 and the default user id.
func sign(signer crypto.Signer, msg []byte) ([]byte, error) {
	if k, ok := signer.(*sm2.PrivateKey); ok {
		return k.SignWithSM2(rand.Reader, nil, msg)
	}
	d := sha256.Sum256(msg)
	return signer.Sign(rand.Reader, d[:], crypto.SHA256)
}

// ErrSignature: the response was not signed by the trusted CA key.
var ErrSignature = errors.New("key broker response: signature does not verify under the trusted CA key")

// verify checks sig over msg with the CA certificate's public key.
func verify(pub any, msg, sig []byte) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if sm2.IsSM2PublicKey(k) {
			if sm2.VerifyASN1WithSM2(k, nil, msg, sig) {
				return nil
			}
			return ErrSignature
		}
		d := sha256.Sum256(msg)
		if ecdsa.VerifyASN1(k, d[:], sig) {
			return nil
		}
		return ErrSignature
	case *rsa.PublicKey:
		d := sha256.Sum256(msg)
		if rsa.VerifyPKCS1v15(k, crypto.SHA256, d[:], sig) == nil {
			return nil
		}
		return ErrSignature
	}
	return fmt.Errorf("key broker response: unsupported CA key type %T", pub)
}
