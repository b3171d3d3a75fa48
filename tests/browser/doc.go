// Package browser holds end-to-end tests of the web dashboard: a real
// server and real agents run in the test process, and chromedp drives
// Debian's Chromium against them. The tests skip when /usr/bin/chromium is
// missing, unless NIXPLANE_REQUIRE_BROWSER=1 (set in CI) makes that fatal.
package browser
