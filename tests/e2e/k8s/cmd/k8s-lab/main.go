// Command k8s-lab is a multi-call binary with the real Kubernetes control plane
// components that the end-to-end tests run on 127.0.0.1:
//
//	k8s-lab apiserver ...           kube-apiserver (k8s.io/kubernetes/cmd/kube-apiserver/app)
//	k8s-lab controller-manager ...  kube-controller-manager (EndpointSlice controller etc.)
//	k8s-lab etcd ...                a single-member etcd (go.etcd.io/etcd/server/v3/embed)
//	k8s-lab kubectl ...             kubectl (k8s.io/kubectl/pkg/cmd)
//
// The component is chosen by the first argument, or by the name the binary is
// invoked as (kube-apiserver, kube-controller-manager, etcd, kubectl), so a
// symlink named kubectl works as kubectl. One binary keeps the build time and
// the disk use down: the components share most of their dependencies.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	_ "time/tzdata" // CronJob time zones, as the upstream mains do

	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
)

var commands = map[string]func(args []string) int{
	"apiserver":               runAPIServer,
	"kube-apiserver":          runAPIServer,
	"controller-manager":      runControllerManager,
	"kube-controller-manager": runControllerManager,
	"etcd":                    runEtcd,
	"kubectl":                 runKubectl,
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: %s apiserver|controller-manager|etcd|kubectl [flags...]\n", filepath.Base(os.Args[0]))
}

func main() {
	name := filepath.Base(os.Args[0])
	if run, ok := commands[name]; ok {
		os.Exit(run(os.Args[1:]))
	}
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	sub := strings.TrimPrefix(os.Args[1], "--")
	if sub == "help" || sub == "h" || sub == "-h" {
		usage()
		os.Exit(0)
	}
	run, ok := commands[sub]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown component %q\n", os.Args[1])
		usage()
		os.Exit(2)
	}
	// Components parse os.Args themselves in places (kubectl's verbosity, plugin
	// handling), so present them with the argv they would see as a standalone binary.
	os.Args = append([]string{sub}, os.Args[2:]...)
	os.Exit(run(os.Args[1:]))
}
