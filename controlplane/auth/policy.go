package auth

import (
	adminv1 "github.com/nixplane/nixplane/gen/nixplane/admin/v1"
	agentv1 "github.com/nixplane/nixplane/gen/nixplane/agent/v1"
	fleetv1 "github.com/nixplane/nixplane/gen/nixplane/fleet/v1"
)

// MethodMetrics is the policy key of the /metrics endpoint.
const MethodMetrics = "/nixplane.http/Metrics"

// DefaultPolicy is who may call what: the rules written in each RPC's
// comment in proto/. A test checks that every method the server registers has
// a rule here.
func DefaultPolicy() Policy {
	read := Rule{Scope: ScopeRead}
	readPost := Rule{Scope: ScopeRead, Mutating: true}
	operate := Rule{Scope: ScopeOperate, Mutating: true}
	admin := Rule{Scope: ScopeAdmin, Mutating: true}
	adminRead := Rule{Scope: ScopeAdmin}
	ownAccount := Rule{Scope: ScopeRead, Mutating: true, SessionOnly: true}
	return Policy{
		agentv1.AgentService_Connect_FullMethodName: {Agent: true},

		fleetv1.FleetService_ListHosts_FullMethodName:        read,
		fleetv1.FleetService_GetHost_FullMethodName:          read,
		fleetv1.FleetService_WatchFleet_FullMethodName:       read,
		fleetv1.FleetService_RefreshHost_FullMethodName:      readPost,
		fleetv1.FleetService_RunCommand_FullMethodName:       operate,
		fleetv1.FleetService_StopCommand_FullMethodName:      operate,
		fleetv1.FleetService_GetCommand_FullMethodName:       read,
		fleetv1.FleetService_ListCommands_FullMethodName:     read,
		fleetv1.FleetService_GetCommandLog_FullMethodName:    read,
		fleetv1.FleetService_FollowCommandLog_FullMethodName: read,
		fleetv1.FleetService_AddHost_FullMethodName:          admin,
		fleetv1.FleetService_RemoveHost_FullMethodName:       admin,
		fleetv1.FleetService_RotateHostToken_FullMethodName:  admin,
		fleetv1.FleetService_RunBulkCommand_FullMethodName:   operate,
		fleetv1.FleetService_GetBulkCommand_FullMethodName:   read,
		fleetv1.FleetService_GetFleetTarget_FullMethodName:   read,
		fleetv1.FleetService_MergeAndDeploy_FullMethodName:   operate,

		adminv1.AdminService_WhoAmI_FullMethodName:          read,
		adminv1.AdminService_CreateAPIToken_FullMethodName:  admin,
		adminv1.AdminService_ListAPITokens_FullMethodName:   adminRead,
		adminv1.AdminService_RevokeAPIToken_FullMethodName:  admin,
		adminv1.AdminService_ListAuditEvents_FullMethodName: adminRead,

		adminv1.AdminService_BeginTOTPEnrollment_FullMethodName:   ownAccount,
		adminv1.AdminService_ConfirmTOTPEnrollment_FullMethodName: ownAccount,
		adminv1.AdminService_DisableTOTP_FullMethodName:           ownAccount,

		MethodMetrics: read,

		"/grpc.health.v1.Health/Check":                                   {Public: true},
		"/grpc.health.v1.Health/Watch":                                   {Public: true},
		"/grpc.health.v1.Health/List":                                    {Public: true},
		"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      {Public: true},
		"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": {Public: true},
	}
}
