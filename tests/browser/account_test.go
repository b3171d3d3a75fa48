package browser

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/pquerna/otp"
	"github.com/pquerna/otp/totp"
)

// whoAmI calls GET /api/whoami with a bearer token and returns the status
// and the scope it names.
func (f *fleet) whoAmI(secret string) (int, string) {
	f.t.Helper()
	req, err := http.NewRequest(http.MethodGet, f.url()+"/api/whoami", nil)
	if err != nil {
		f.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+secret)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	var out struct {
		Scope string `json:"scope"`
	}
	_ = json.Unmarshal(b, &out)
	return res.StatusCode, out.Scope
}

// clearInput empties an input field.
func clearInput(b *browser, sel string) {
	b.t.Helper()
	evalT[string](b, `document.querySelector(`+js(sel)+`).value = ""`)
}

// openAccountMenu opens the user menu and clicks one of its entries.
func openAccountMenu(b *browser, item string) {
	b.t.Helper()
	b.do(chromedp.Click("#user-button"))
	b.waitFor("menu entry "+item, `(() => { const e = document.querySelector(`+js(item)+`); return e && !e.disabled && e.offsetParent !== null; })()`)
	b.do(chromedp.Click(item))
}

const toastText = `(document.querySelector("#toast")?.hidden === false ? document.querySelector("#toast").textContent : "")`

func TestAPITokenPanel(t *testing.T) {
	f := newFleet(t, []hostSpec{{name: "web-1", color: "#7aa2f7"}}, fleetOptions{noAgents: true})
	b := newBrowser(t, 1400, 900)
	b.login(f.url())

	// The admin session sees the panel and the harness's own token in it.
	openAccountMenu(b, "#menu-tokens")
	b.waitFor("the token list", `document.querySelector('#token-rows tr[data-token="browser-test"]') !== null`)
	if s := evalT[string](b, `document.querySelector('#token-rows tr[data-token="browser-test"] td:nth-child(2)').textContent`); s != "admin" {
		t.Errorf("browser-test token shows scope %q, want admin", s)
	}

	// Create an operate token that expires in 7 days; its secret is shown once.
	b.do(chromedp.SendKeys("#token-name", "ci-deploy"), chromedp.SetValue("#token-scope", "operate"), chromedp.SetValue("#token-ttl", "7"),
		chromedp.Click("#token-create"))
	b.waitFor("the new secret", `!document.querySelector("#token-secret-box").hidden && document.querySelector("#token-secret").textContent.length > 20`)
	secret := evalT[string](b, `document.querySelector("#token-secret").textContent`)
	if n := evalT[string](b, `document.querySelector("#token-secret-name").textContent`); n != "ci-deploy" {
		t.Errorf("secret box names %q, want ci-deploy", n)
	}
	b.waitFor("ci-deploy listed", `document.querySelector('#token-rows tr[data-token="ci-deploy"]') !== null`)
	row := `#token-rows tr[data-token="ci-deploy"]`
	if s := evalT[string](b, `document.querySelector(`+js(row+` td:nth-child(2)`)+`).textContent`); s != "operate" {
		t.Errorf("ci-deploy shows scope %q, want operate", s)
	}
	exp := evalT[string](b, `document.querySelector(`+js(row+` td:nth-child(4)`)+`).textContent`)
	if want := time.Now().UTC().Add(7 * 24 * time.Hour).Format("2006-01-02"); !strings.HasPrefix(exp, want) {
		t.Errorf("ci-deploy expires %q, want %s…", exp, want)
	}
	if st, scope := f.whoAmI(secret); st != http.StatusOK || scope != "SCOPE_OPERATE" {
		t.Fatalf("the new token: whoami %d %q, want 200 SCOPE_OPERATE", st, scope)
	}

	// A second token of the same name is refused with a readable message.
	clearInput(b, "#token-name")
	b.do(chromedp.SendKeys("#token-name", "ci-deploy"), chromedp.Click("#token-create"))
	b.waitFor("the duplicate refused", toastText+`.includes("exists already")`)

	// Revoke it from the panel: it stops working at once.
	b.do(chromedp.Click(row + ` button[data-revoke]`))
	b.waitFor("the confirm dialog", `document.querySelector("#confirm-dialog").open`)
	b.do(chromedp.Click("#confirm-ok"))
	b.waitFor("ci-deploy gone", `document.querySelector(`+js(row)+`) === null`)
	b.waitFor("the secret box cleared", `document.querySelector("#token-secret-box").hidden`)
	if st, _ := f.whoAmI(secret); st != http.StatusUnauthorized {
		t.Errorf("the revoked token: whoami %d, want 401", st)
	}
	b.do(chromedp.Click("#tokens-close"))
	b.waitFor("the panel closed", `!document.querySelector("#tokens-dialog").open`)
}

func TestTOTPEnrolment(t *testing.T) {
	f := newFleet(t, []hostSpec{{name: "web-1", color: "#7aa2f7"}}, fleetOptions{noAgents: true})
	b := newBrowser(t, 1400, 900)
	b.login(f.url())

	openAccountMenu(b, "#menu-totp")
	b.waitFor("the two-factor dialog", `document.querySelector("#totp-dialog").open && !document.querySelector("#totp-begin").hidden`)
	if !evalT[bool](b, `(() => { const p = document.querySelector("#totp-password"); return p.type === "password" && p.autocomplete === "current-password" && p.offsetParent !== null; })()`) {
		t.Fatal("the set-up step does not ask for the current password")
	}

	// Setting up needs the account's password: a wrong one is refused with
	// the server's words in the dialog, and no secret is shown.
	b.do(chromedp.SendKeys("#totp-password", "not the password"), chromedp.Click("#totp-begin"))
	b.waitFor("the wrong password refused", `(() => { const e = document.querySelector("#totp-error"); return !e.hidden && e.textContent.includes("wrong password"); })()`)
	if !evalT[bool](b, `document.querySelector("#totp-enrol").hidden && document.querySelector("#totp-qr") === null && document.querySelector("#totp-secret").textContent === "" && document.querySelector("#totp-password").value === ""`) {
		t.Fatal("a wrong password showed a secret or kept the typed password")
	}
	// Enter in the password field sets it up, as the button does.
	b.do(chromedp.SendKeys("#totp-password", adminPassword+"\r"))
	// The QR code is a data: image: it loads only if the CSP allows it.
	b.waitFor("the QR code", `(() => { const i = document.querySelector("#totp-qr"); return i && i.complete && i.naturalWidth > 0; })()`)
	secret := evalT[string](b, `document.querySelector("#totp-secret").textContent`)
	if len(secret) < 16 {
		t.Fatalf("secret %q", secret)
	}
	if !evalT[bool](b, `document.querySelector("#totp-error").hidden && document.querySelector("#totp-password-row").hidden`) {
		t.Error("the password field or its error is still shown next to the secret")
	}

	// A wrong code is refused and nothing changes.
	b.do(chromedp.SendKeys("#totp-code", "000000"), chromedp.Click("#totp-confirm"))
	b.waitFor("the wrong code refused", toastText+`.includes("wrong or expired")`)

	opts := totp.ValidateOpts{Period: 30, Digits: otp.DigitsSix, Algorithm: otp.AlgorithmSHA1}
	code, err := totp.GenerateCodeCustom(secret, time.Now(), opts)
	if err != nil {
		t.Fatal(err)
	}
	clearInput(b, "#totp-code")
	b.do(chromedp.SendKeys("#totp-code", code), chromedp.Click("#totp-confirm"))
	b.waitFor("two-factor on", toastText+`.includes("is on") && !document.querySelector("#totp-disable").hidden`)
	b.waitFor("the menu says on", `document.querySelector("#menu-totp").textContent.includes(": on")`)

	// Turning it off needs a fresh code: the one just used is refused, the
	// next time step's is taken.
	b.do(chromedp.SendKeys("#totp-code", code), chromedp.Click("#totp-disable"))
	b.waitFor("the used code refused", toastText+`.includes("wrong or expired")`)
	next, err := totp.GenerateCodeCustom(secret, time.Now().Add(30*time.Second), opts)
	if err != nil {
		t.Fatal(err)
	}
	clearInput(b, "#totp-code")
	b.do(chromedp.SendKeys("#totp-code", next), chromedp.Click("#totp-disable"))
	b.waitFor("two-factor off", toastText+`.includes("is off") && !document.querySelector("#totp-begin").hidden`)
	if !evalT[bool](b, `document.querySelector("#totp-qr") === null && document.querySelector("#totp-secret").textContent === ""`) {
		t.Error("the secret is still shown after enrolment ended")
	}
}
