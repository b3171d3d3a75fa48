package webui

import (
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	"github.com/nixplane/nixplane/controlplane/status"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
	typesv1 "github.com/nixplane/nixplane/gen/nixplane/types/v1"
)

// The first paint mirrors what src/render.ts writes, so the page does not
// change when the script takes over. Keep the two in step.

const (
	highMetric   = 80.0
	staleAfter   = 60 * time.Second
	okSeenWithin = 10 * time.Second
	warnWithin   = 50 * time.Second
)

// hostView is one host as the row and card templates show it.
type hostView struct {
	ID            string
	Hostname      string
	Online        bool
	Busy          bool
	Stale         bool
	State         string
	StatusTitle   string
	NameTitle     string
	Badge         string
	TypeIcon      string
	TypeTitle     string
	LocationIcon  string
	Location      string
	DeviceIcon    string
	Device        string
	CPU           string
	CPUHigh       bool
	CPUTitle      string
	RAM           string
	RAMHigh       bool
	RAMTitle      string
	LastSeen      string
	LastSeenLevel string
	Agent         string
	AgentOutdated bool
	AgentTitle    string
	Generation    string
	GenTitle      string
	Comps         []compView
}

// compView is one status compartment.
type compView struct {
	Name   string
	Label  string
	Status string
	Title  string
	HasPR  bool
}

func sortedHosts(hosts []*fleetv1.Host) []*fleetv1.Host {
	out := append([]*fleetv1.Host(nil), hosts...)
	sort.SliceStable(out, func(i, j int) bool {
		a, b := hostname(out[i]), hostname(out[j])
		if a != b {
			return a < b
		}
		return out[i].GetHostId() < out[j].GetHostId()
	})
	return out
}

func hostname(h *fleetv1.Host) string {
	if n := h.GetHostname(); n != "" {
		return n
	}
	return h.GetHostId()
}

func newHostView(h *fleetv1.Host, cmd *fleetv1.Command, pr *prView, serverVersion string, now time.Time) hostView {
	v := hostView{
		ID:       h.GetHostId(),
		Hostname: hostname(h),
		Online:   h.GetOnline(),
		Agent:    h.GetAgentVersion(),
	}
	if cmd != nil && status.IsTerminal(cmd.GetState()) {
		cmd = nil
	}
	v.Busy = cmd != nil
	var lastSeen time.Time
	if ts := h.GetLastSeen(); ts != nil && ts.IsValid() && ts.GetSeconds() > 0 {
		lastSeen = ts.AsTime()
	}
	limit := staleAfter
	if d := h.GetHeartbeatInterval(); d != nil && 2*d.AsDuration() > limit {
		limit = 2 * d.AsDuration()
	}
	v.Stale = v.Online && !lastSeen.IsZero() && now.Sub(lastSeen) > limit
	switch {
	case !v.Online:
		v.State = "offline"
		v.StatusTitle = "Offline — last seen " + ago(lastSeen, now)
	case v.Busy:
		v.State = "busy"
		v.StatusTitle = "Running " + cmd.GetCommand()
	case v.Stale:
		v.State = "stale"
		v.StatusTitle = "No heartbeat for " + strings.TrimSuffix(ago(lastSeen, now), " ago")
	default:
		v.State = "online"
		v.StatusTitle = "Online"
	}
	v.NameTitle = joinNonEmpty("\n", v.Hostname, h.GetOsVersion(), prefixed("nixpkgs ", h.GetNixpkgsVersion()))
	if cmd != nil {
		v.Badge = cmd.GetCommand()
		if cmd.GetProgressTotal() > 0 {
			v.Badge += fmt.Sprintf(" %d/%d", cmd.GetProgressCurrent(), cmd.GetProgressTotal())
		}
	}
	v.TypeIcon, v.TypeTitle = typeIcon(h.GetHostType())
	v.TypeTitle = joinNonEmpty(" — ", v.TypeTitle, h.GetOsVersion())
	v.Location, v.LocationIcon = h.GetLocation(), locationIcon(h.GetLocation())
	v.Device, v.DeviceIcon = h.GetDeviceType(), deviceIcon(h.GetDeviceType())

	v.CPU, v.RAM, v.CPUTitle, v.RAMTitle = "—", "—", "No metrics", "No metrics"
	if m := h.GetMetrics(); m != nil {
		v.CPU, v.CPUHigh = pct(m.GetCpuPercent()), m.GetCpuPercent() >= highMetric
		v.RAM, v.RAMHigh = pct(m.GetRamPercent()), m.GetRamPercent() >= highMetric
		v.CPUTitle = fmt.Sprintf("CPU %.1f%%", m.GetCpuPercent())
		v.RAMTitle = fmt.Sprintf("RAM %s, swap %s, load %.2f", pct(m.GetRamPercent()), pct(m.GetSwapPercent()), m.GetLoad1())
	}

	v.LastSeen = ago(lastSeen, now)
	switch age := now.Sub(lastSeen); {
	case lastSeen.IsZero() || !v.Online:
		v.LastSeenLevel = "none"
	case age <= okSeenWithin:
		v.LastSeenLevel = "ok"
	case age <= warnWithin:
		v.LastSeenLevel = "warn"
	default:
		v.LastSeenLevel = "stale"
	}

	if v.Agent == "" {
		v.Agent = "—"
	}
	v.AgentOutdated = h.GetAgentOutdated()
	if v.AgentOutdated {
		v.AgentTitle = fmt.Sprintf("Agent %s differs from server %s", h.GetAgentVersion(), serverVersion)
	} else {
		v.AgentTitle = "Agent " + h.GetAgentVersion()
	}
	v.Generation = "—"
	if g := h.GetGeneration(); g != "" {
		v.Generation = shortHash(g)
	}
	v.GenTitle = joinNonEmpty("\n", h.GetGeneration(), h.GetGenerationMessage())

	us := h.GetUpdateStatus()
	for _, c := range []struct {
		name, label string
		comp        *typesv1.Compartment
	}{
		{"agent", "Agent", us.GetAgent()},
		{"git", "Git", us.GetGit()},
		{"lock", "Lock", us.GetLock()},
		{"system", "System", us.GetSystem()},
		{"tests", "Tests", us.GetTests()},
	} {
		st := compStatus(c.comp.GetStatus())
		lines := []string{c.label + ": " + st}
		if msg := c.comp.GetMessage(); msg != "" {
			lines = append(lines, msg)
		}
		if ts := c.comp.GetCheckedAt(); ts != nil && ts.IsValid() && ts.GetSeconds() > 0 {
			lines = append(lines, "Checked "+ago(ts.AsTime(), now))
		} else {
			lines = append(lines, "Not checked yet")
		}
		cv := compView{Name: c.name, Label: c.label, Status: st, HasPR: c.name == "lock" && pr != nil}
		if cv.HasPR {
			lines = append(lines, pr.LockLines...)
		}
		cv.Title = strings.Join(lines, "\n")
		v.Comps = append(v.Comps, cv)
	}
	return v
}

func compStatus(s typesv1.CompartmentStatus) string {
	switch s {
	case typesv1.CompartmentStatus_COMPARTMENT_STATUS_OK:
		return "ok"
	case typesv1.CompartmentStatus_COMPARTMENT_STATUS_OUTDATED:
		return "outdated"
	case typesv1.CompartmentStatus_COMPARTMENT_STATUS_ERROR:
		return "error"
	case typesv1.CompartmentStatus_COMPARTMENT_STATUS_WORKING:
		return "working"
	default:
		return "unknown"
	}
}

func typeIcon(t typesv1.HostType) (icon, title string) {
	switch t {
	case typesv1.HostType_HOST_TYPE_NIXOS:
		return "❄", "NixOS"
	case typesv1.HostType_HOST_TYPE_DARWIN:
		return "⌘", "macOS (nix-darwin)"
	case typesv1.HostType_HOST_TYPE_HOME_MANAGER:
		return "⌂", "Home Manager"
	default:
		return "?", "Unknown host type"
	}
}

func locationIcon(loc string) string {
	switch strings.ToLower(loc) {
	case "":
		return ""
	case "home":
		return "⌂"
	case "cloud":
		return "☁"
	case "office", "work":
		return "▦"
	default:
		return "◉"
	}
}

func deviceIcon(dev string) string {
	switch strings.ToLower(dev) {
	case "":
		return ""
	case "server":
		return "▤"
	case "desktop":
		return "▭"
	case "laptop":
		return "⌨"
	case "gaming":
		return "◈"
	default:
		return "▪"
	}
}

func pct(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "—"
	}
	return fmt.Sprintf("%d%%", int(math.Round(v)))
}

func shortHash(s string) string {
	if len(s) > 7 {
		return s[:7]
	}
	return s
}

func ago(t, now time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return formatAge(now.Sub(t)) + " ago"
}

// formatAge matches formatDuration in src/model.ts.
func formatAge(d time.Duration) string {
	s := int64(d / time.Second)
	if s < 0 {
		s = 0
	}
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600:
		return fmt.Sprintf("%dm", s/60)
	case s < 48*3600:
		return fmt.Sprintf("%dh", s/3600)
	default:
		return fmt.Sprintf("%dd", s/86400)
	}
}

func prefixed(p, s string) string {
	if s == "" {
		return ""
	}
	return p + s
}

func joinNonEmpty(sep string, parts ...string) string {
	var out []string
	for _, p := range parts {
		if p != "" {
			out = append(out, p)
		}
	}
	return strings.Join(out, sep)
}
